#!/usr/bin/env python3
"""
The benchmark's streaming load client: N concurrent Server-Sent Events streams, each chunk's
latency measured against the timestamp the model wrote into it (bench/stream_source.py).

    python bench/stream_client.py --port 8080 --path '/post/predict?id=stream' --streams 100 \\
        --duration 5 --chunks 50 --interval 0.02

Each of --streams keep-alive connections POSTs {"chunks": C, "interval": S} with
`Accept: text/event-stream`, reads the answer (HTTP/1.1 chunked, SSE events), and once the
stream has ended sends the next request, until --duration seconds have passed (the streams
then in progress are read to their end). The connections start their first request at
random moments within one stream's length (chunks x interval; one stream starts at once),
so that new streams come at a steady rate rather than in a burst, and chunks do not all
fall due together.

For every `data:` event it notes the arrival time (time.monotonic(), taken once per read
from the socket, before the data is parsed) minus the chunk's "t" (the model's
time.monotonic() just before it wrote it: one CLOCK_MONOTONIC for every process of the
machine); for the first chunk of each stream also the time from the request's send to its
arrival (time to first chunk), and the model's own share of that ("t" - "r": from the
request's arrival at the model to its first chunk's write). SSE comments (`:` lines, a
keepalive) are counted and skipped; `event: done` is counted; an `event: error`, a status
other than 200, a stream that ends with fewer chunks than asked or a connection lost
mid-stream is an error. Prints one JSON object: counts, errors, and the percentiles (ms).

With --openai (bench/run.py's OpenAI cases) the request is --body (an OpenAI chat request with
`"stream": true`) and the answer OpenAI's SSE: `data: {chat.completion.chunk}` events ending
with `data: [DONE]`, chunked or with a Content-Length (a fixed body, as the fixed upstream
sends it). Those chunks carry no clock: only the time to first chunk and the streams are
measured; a stream without a chunk or without `[DONE]` is an error.

Standard library only, one process, asyncio's default loop, the garbage collector off
(a short run allocates no cycles worth collecting, and a collection's pause would be
counted as latency).
"""

import argparse
import asyncio
import gc
import json
import math
import random
import re
import resource
import sys
import time

CONNECT_BATCH = 50  # below the server's listen backlog (Twisted's default is 50)
# A chunk of bench/stream_source.py, {"n": I, "t": T, "r": R}, however its JSON is spaced.
STAMP = re.compile(rb'^\{\s*"n":\s*\d+,\s*"t":\s*([0-9.eE+-]+),\s*"r":\s*([0-9.eE+-]+)\s*\}$')
MAX_ERROR_SAMPLES = 5


def timestamps(text: bytes) -> tuple[float, float]:
    """A chunk's "t" and "r", read as JSON (a shape STAMP does not know)."""
    chunk = json.loads(text)
    return float(chunk["t"]), float(chunk["r"])


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99/p99.9/max (nearest rank) and the mean of values in seconds, in ms."""
    if not values:
        return {"count": 0}
    values = sorted(values)
    n = len(values)

    def rank(p):
        return values[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] * 1000

    return {"count": n, "p50_ms": round(rank(50), 4), "p90_ms": round(rank(90), 4), "p99_ms": round(rank(99), 4),
            "p999_ms": round(rank(99.9), 4), "max_ms": round(values[-1] * 1000, 4),
            "mean_ms": round(sum(values) / n * 1000, 4)}


class Run:
    def __init__(self, args, loop):
        self.args = args
        self.loop = loop
        body = (args.body.encode() if args.body is not None
                else json.dumps({"chunks": args.chunks, "interval": args.interval}).encode())
        auth = f"Authorization: {args.authorization}\r\n" if args.authorization else ""
        self.request = (
            f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nAccept: {args.accept}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.latencies: list[float] = []
        self.first: list[float] = []
        self.model_first: list[float] = []
        self.to_model: list[float] = []
        self.streams = 0
        self.chunks = 0
        self.keepalives = 0
        self.done_events = 0
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.open = 0
        self.finished = loop.create_future()
        self.end_at = None
        self.last_arrival = None
        self.arrivals = [] if args.samples else None  # each chunk's arrival, for --samples

    def error(self, kind: str, sample: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if sample and len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{kind}: {sample[:300]}")

    def closed(self) -> None:
        self.open -= 1
        if self.open <= 0 and not self.finished.done():
            self.finished.set_result(None)


class Client(asyncio.Protocol):
    """One keep-alive connection, one stream at a time."""

    def __init__(self, run: Run):
        self.run = run
        self.transport = None
        self.buffer = bytearray()
        self.events = bytearray()
        self.state = "idle"
        self.size = 0
        self.length = 0
        self.sent = 0.0
        self.got = 0
        self.done = False
        self.gone = False

    def connection_made(self, transport):
        self.transport = transport

    def start(self) -> None:
        """The first request, at a random moment within one stream's length."""
        args = self.run.args
        spread = args.chunks * args.interval if args.streams > 1 else 0.0
        self.run.loop.call_later(random.uniform(0, spread), self.send)

    def send(self) -> None:
        if self.gone:
            return
        self.state = "head"
        self.got = 0
        self.done = False
        self.events.clear()
        self.sent = time.monotonic()
        self.transport.write(self.run.request)

    def data_received(self, data):
        now = time.monotonic()
        self.buffer += data
        buffer = self.buffer
        run = self.run
        while True:
            state = self.state
            if state == "size":
                at = buffer.find(b"\r\n")
                if at < 0:
                    return
                self.size = int(bytes(buffer[:at]).split(b";", 1)[0], 16)
                del buffer[:at + 2]
                self.state = "data" if self.size else "trailer"
            elif state == "data":
                if len(buffer) < self.size + 2:
                    return
                self.events += buffer[:self.size]
                del buffer[:self.size + 2]
                self.state = "size"
                self.sse(now)
            elif state == "head":
                at = buffer.find(b"\r\n\r\n")
                if at < 0:
                    return
                head = bytes(buffer[:at]).decode("latin-1").split("\r\n")
                del buffer[:at + 4]
                status = int(head[0].split(" ", 2)[1])
                chunked, self.length = False, 0
                for line in head[1:]:
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    if key == "transfer-encoding" and "chunked" in value.lower():
                        chunked = True
                    elif key == "content-length":
                        self.length = int(value)
                if status != 200:
                    self.state = "refused"
                    self.status = status
                elif not chunked and run.args.openai:
                    self.state = "body"  # a fixed SSE body with a Content-Length (the fixed upstream)
                elif not chunked:
                    run.error("not_chunked", head[0])
                    return self.close()
                else:
                    self.state = "size"
            elif state == "trailer":
                at = buffer.find(b"\r\n")
                if at < 0:
                    return
                del buffer[:at + 2]
                if at == 0:
                    self.ended(now)
                    if self.state != "head":
                        return
            elif state == "body":
                if len(buffer) < self.length:
                    return
                self.events += buffer[:self.length]
                del buffer[:self.length]
                self.sse(now)
                self.ended(now)
                if self.state != "head":
                    return
            elif state == "refused":
                if len(buffer) < self.length:
                    return
                run.error(f"status_{self.status}", bytes(buffer[:self.length]).decode(errors="replace"))
                del buffer[:self.length]
                return self.next()
            else:
                if buffer:
                    run.error("unexpected_data", bytes(buffer[:100]).decode(errors="replace"))
                    return self.close()
                return

    @staticmethod
    def fields(event: bytes) -> tuple[bytes, list[bytes]]:
        """An SSE event's name (b"message" if none) and data lines; comment lines are skipped."""
        name, data = b"message", []
        for line in event.split(b"\n"):
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value
        return name, data

    def sse(self, now: float) -> None:
        events = self.events
        run = self.run
        while True:
            at = events.find(b"\n\n")
            if at < 0:
                return
            event = bytes(events[:at])
            del events[:at + 2]
            if event.startswith(b"data: ") and b"\n" not in event:  # the usual event: one chunk
                name, data = b"message", [event[6:]]
            else:
                name, data = self.fields(event)
            if not data and name == b"message":
                run.keepalives += 1
                continue
            if name == b"message" and run.args.openai:
                if data == [b"[DONE]"]:
                    self.done = True
                    run.done_events += 1
                    continue
                if self.got == 0:
                    run.first.append(now - self.sent)
                self.got += 1
                run.chunks += 1
                run.last_arrival = now
            elif name == b"message":
                text = data[0] if len(data) == 1 else b"\n".join(data)
                stamp = STAMP.search(text)  # cheaper than json.loads: the client must not be the bottleneck
                try:
                    t, r = (float(stamp.group(1)), float(stamp.group(2))) if stamp else timestamps(text)
                except (ValueError, KeyError, TypeError):
                    run.error("bad_chunk", text.decode(errors="replace"))
                    continue
                run.latencies.append(now - t)
                if run.arrivals is not None:
                    run.arrivals.append(now)
                if self.got == 0:
                    run.first.append(now - self.sent)
                    run.model_first.append(t - r)
                    run.to_model.append(r - self.sent)
                self.got += 1
                run.chunks += 1
                run.last_arrival = now
            elif name == b"done":
                run.done_events += 1
            elif name == b"error":
                run.error("error_event", b"\n".join(data).decode(errors="replace"))
            else:
                run.error("unknown_event", event.decode(errors="replace"))

    def ended(self, now: float) -> None:
        run = self.run
        run.streams += 1
        if run.args.openai:
            if not self.got or not self.done:
                run.error("short_stream", f"{self.got} chunks, {'with' if self.done else 'no'} [DONE]")
        elif self.got < run.args.chunks:
            run.error("short_stream", f"{self.got} of {run.args.chunks} chunks")
        self.next()

    def next(self) -> None:
        self.state = "idle"
        if time.monotonic() < self.run.end_at:
            self.send()
        else:
            self.close()

    def close(self) -> None:
        if not self.gone:
            self.transport.close()

    def connection_lost(self, exc):
        if self.gone:
            return
        self.gone = True
        if self.state != "idle":
            self.run.error("closed_mid_stream", str(exc or "closed by the server"))
        self.run.closed()


async def main_async(args) -> dict:
    loop = asyncio.get_running_loop()
    run = Run(args, loop)
    clients = []
    connect_errors = 0
    for start in range(0, args.streams, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, args.streams - start)
        made = await asyncio.gather(
            *(loop.create_connection(lambda: Client(run), args.host, args.port) for _ in range(batch)),
            return_exceptions=True)
        for result in made:
            if isinstance(result, BaseException):
                connect_errors += 1
                run.error("connect", str(result))
            else:
                clients.append(result[1])
    run.open = len(clients)
    started = time.monotonic()
    run.end_at = started + args.duration
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    for client in clients:
        client.start()
    timeout = args.duration + args.chunks * args.interval + args.timeout
    if clients:
        try:
            await asyncio.wait_for(asyncio.shield(run.finished), timeout)
        except asyncio.TimeoutError:
            open_now = sum(1 for client in clients if not client.gone)
            run.error("timeout", f"{open_now} streams still open {timeout:g} s after the start")
            for client in clients:
                client.close()
    elapsed = time.monotonic() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    if args.samples:
        with open(args.samples, "w") as f:
            for arrival, latency in zip(run.arrivals, run.latencies):
                f.write(f"{arrival - started:.6f} {latency * 1000:.4f}\n")
    span = (run.last_arrival - started) if run.last_arrival else elapsed
    return {
        "streams_wanted": args.streams, "connections": len(clients), "duration_s": args.duration,
        "chunks_per_stream": args.chunks, "interval_s": args.interval,
        "streams": run.streams, "chunks": run.chunks, "elapsed_s": round(elapsed, 3),
        "chunks_per_s": round(run.chunks / span, 1) if span > 0 else 0.0,
        "keepalives": run.keepalives, "done_events": run.done_events,
        "errors": run.errors, "error_samples": run.error_samples,
        "client_cpu_s": round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, 3),
        "chunk_latency": percentiles(run.latencies),
        "first_chunk": percentiles(run.first),
        "model_first_chunk": percentiles(run.model_first),
        "request_to_model": percentiles(run.to_model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams (connections)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds during which new streams start")
    parser.add_argument("--chunks", type=int, default=50, help="chunks each stream asks for")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two chunks of a stream")
    parser.add_argument("--accept", default="text/event-stream")
    parser.add_argument("--openai", action="store_true",
                        help="OpenAI's SSE (chat.completion.chunk events, data: [DONE]): time to first chunk only")
    parser.add_argument("--body", help="the request's JSON body (default: {\"chunks\": C, \"interval\": S})")
    parser.add_argument("--authorization", help="an Authorization header's value (e.g. 'Bearer KEY')")
    parser.add_argument("--samples", metavar="FILE",
                        help="also write each chunk's arrival (seconds from the start) and latency (ms) to FILE")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds past the last stream's expected end before the run gives up")
    args = parser.parse_args()
    if args.streams < 1 or args.chunks < 1 or args.interval < 0 or args.duration < 0:
        parser.error("--streams and --chunks must be at least 1, --interval and --duration at least 0")
    gc.disable()
    result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
