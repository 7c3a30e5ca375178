# A .tac deployment of aibackend:  twistd -ny etc/aibackend.tac
#
# The configuration file is $AIBACKEND_CONFIG, or etc/aibackend.toml beside this file.
# $AIBACKEND_LISTEN, if set, holds listen endpoints (space separated) that replace the
# configuration's, like --listen. $AIBACKEND_PROCESSES, if set, is like --processes.
import os

from twisted.application import service

from aibackend.tap import Options, makeService

_here = os.path.dirname(os.path.abspath(__file__))
_args = ["--config", os.environ.get("AIBACKEND_CONFIG") or os.path.join(_here, "aibackend.toml")]
for _description in os.environ.get("AIBACKEND_LISTEN", "").split():
    _args += ["--listen", _description]
if os.environ.get("AIBACKEND_PROCESSES"):
    _args += ["--processes", os.environ["AIBACKEND_PROCESSES"]]

_options = Options()
_options.parseOptions(_args)

application = service.Application("aibackend")
makeService(_options).setServiceParent(application)
