"""
A raw model that crashes at once until its flag file exists, for the integration tests.

    python phoenix.py FLAG

Without the file FLAG it writes "no flag file yet" on stderr and exits with status 3;
with it, it answers every line with C{{"pid": its pid, "risen": true}}.
"""

import json
import os
import sys

if not os.path.exists(sys.argv[1]):
    sys.stderr.write("no flag file yet\n")
    sys.exit(3)
for line in sys.stdin:
    print(json.dumps({"pid": os.getpid(), "risen": True}), flush=True)
