# The simplest subprocess model (protocol "raw"): one JSON line in, one JSON line out.
import json, sys
for line in sys.stdin:
    numbers = json.loads(line).get("numbers", [])
    print(json.dumps({"sum": sum(numbers), "count": len(numbers)}), flush=True)
