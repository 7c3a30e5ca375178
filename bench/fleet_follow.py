"""
How long a change made on one daemon of a fleet takes to reach the others (issue 19).

Starts a redis-server of its own (loopback, a free port, its files in a temporary
directory) and three daemons on it (C{--store redis://...}), then makes C{--changes}
changes (adds of new models, then removes of them, alternately) through daemon A, each once
the one before has reached the others, and times, for each, how long after A answered
(the change committed in Redis and applied on A) daemons B and C serve it: each polls
C{/get/status?id=...} on a connection of its own, so the figure includes up to one poll's
round trip (a fraction of a millisecond on loopback). Prints the median, the 90th
percentile and the worst, and, with C{--json}, writes them.

    .venv/bin/python bench/fleet_follow.py [--changes 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time

from aibackend.testing import Daemon, RedisServer, find_redis_server


def wait_served(port: int, model_id: str, present: bool, deadline: float) -> float:
    """Poll until the daemon on C{port} has (or no longer has) the model; the monotonic time it did."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        while time.monotonic() < deadline:
            connection.request("GET", f"/get/status?id={model_id}")
            response = connection.getresponse()
            response.read()
            if (response.status == 200) == present:
                return time.monotonic()
        raise SystemExit(f"daemon on port {port} did not follow the change to {model_id} in time")
    finally:
        connection.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--json", help="write the figures there too")
    args = parser.parse_args(argv)
    program = find_redis_server()
    if program is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="aibackend-fleet-") as directory:
        redis = RedisServer(program, directory)
        daemons = []
        try:
            for name in "abc":
                daemons.append(Daemon(None, "--store", redis.url, state=f"{directory}/state-{name}", cwd=directory))
            a, b, c = daemons
            delays = []
            for index in range(args.changes):
                model_id = f"follow{index // 2}"
                adding = index % 2 == 0
                started = time.monotonic()
                if adding:
                    reply = a.add({"id": model_id, "type": "http", "url": "http://127.0.0.1:1/"})
                    assert reply.status == 201, reply
                else:
                    reply = a.remove(model_id)
                    assert reply.status == 200, reply
                answered = time.monotonic()
                seen = {}

                def watch(daemon):
                    seen[daemon.port] = wait_served(daemon.port, model_id, adding, answered + 10)

                watchers = [threading.Thread(target=watch, args=(daemon,)) for daemon in (b, c)]
                for watcher in watchers:
                    watcher.start()
                for watcher in watchers:
                    watcher.join()
                delays.append((max(seen.values()) - answered, max(seen.values()) - started))
        finally:
            for daemon in daemons:
                daemon.stop()
            redis.stop()
    after_answer = sorted(d[0] * 1000 for d in delays)
    after_request = sorted(d[1] * 1000 for d in delays)

    def figures(values):
        return {"median_ms": round(statistics.median(values), 2),
                "p90_ms": round(values[int(len(values) * 0.9) - 1], 2), "worst_ms": round(values[-1], 2)}

    result = {"changes": len(delays), "after_the_answer": figures(after_answer),
              "after_the_request": figures(after_request)}
    print(f"{len(delays)} changes made on daemon A, served by B and C:")
    for what, values in (("after A answered", result["after_the_answer"]),
                         ("after the request was sent to A", result["after_the_request"])):
        print(f"  {what}: median {values['median_ms']} ms, p90 {values['p90_ms']} ms, worst {values['worst_ms']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
