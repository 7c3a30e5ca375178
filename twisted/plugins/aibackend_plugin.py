# Makes `twistd aibackend` exist. Only a pointer: importing the reactor (or aibackend)
# here would break `twistd -r REACTOR` whenever the plugin cache is stale.
from twisted.application.service import ServiceMaker

aibackend = ServiceMaker(
    "aibackend",
    "aibackend.tap",
    "One front door to every AI model: HTTP model servers and supervised programs.",
    "aibackend",
)
