#!/usr/bin/env python3
"""
The benchmark's streaming model: the same timestamped chunks, either as a `jsonl`
subprocess model of aibackend (stdin/stdout) or as Server-Sent Events over HTTP (the
source read directly, through nginx, aiohttp, or aibackend's HTTP model).

    python bench/stream_source.py --jsonl             # a jsonl model (the daemon starts it)
    python bench/stream_source.py --port 8090         # an SSE server on 127.0.0.1:8090

A request's input is {"chunks": N, "interval": S, "hold": false} (each key may be left
out: 10 chunks, 0.02 s). The first chunk goes at once, then one every S seconds (on a
fixed schedule from the first, so a late one does not delay the next). Each chunk is
{"n": I, "t": T, "r": R}: T is time.monotonic() (CLOCK_MONOTONIC, one clock for every
process of the machine) taken just before the chunk is written, R when the request came.
A reader that notes when each chunk arrives gets, from T, the latency of everything
between the model's write and its own read: the gateway, or nothing but the socket.

Then the stream ends: jsonl {"id": ID, "done": true}; HTTP the chunked body ends (the
events are only `data:` lines). With "hold": true, the stream is kept open after its
chunks, without an end, until the client goes away (jsonl: the daemon's cancel line).
Cancel lines stop a stream's chunks. Over HTTP, GET (any path) answers {"ok": true}, so
readiness checks find it; a POST whose body is not a JSON object is a 400.

One process, asyncio's default event loop (as the aiohttp peer), written for speed: every
stream is a timer, each chunk one write.
"""

import argparse
import asyncio
import json
import os
import sys

DEFAULT_CHUNKS = 10
DEFAULT_INTERVAL = 0.02
MAX_HEAD = 16384
MAX_BODY = 1 << 20


def parse_input(data) -> tuple[int, float, bool]:
    """(chunks, interval, hold) from a request's input; ValueError for a bad one."""
    if not isinstance(data, dict):
        raise ValueError('send {"chunks": N, "interval": S, "hold": false}')
    chunks = data.get("chunks", DEFAULT_CHUNKS)
    interval = data.get("interval", DEFAULT_INTERVAL)
    hold = data.get("hold", False)
    if not isinstance(chunks, int) or isinstance(chunks, bool) or not 0 <= chunks <= 1_000_000:
        raise ValueError("chunks must be a whole number from 0 to 1000000")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0 <= interval <= 3600:
        raise ValueError("interval must be a number of seconds from 0 to 3600")
    if not isinstance(hold, bool):
        raise ValueError("hold must be true or false")
    return chunks, float(interval), hold


class Stream:
    """One request's chunks, once started: write(payload) for each, then end() (unless held)."""

    def __init__(self, loop, chunks: int, interval: float, hold: bool, write, end):
        self.loop = loop
        self.chunks = chunks
        self.interval = interval
        self.hold = hold
        self.write = write
        self.end = end
        self.received = loop.time()
        self.n = 0
        self.timer = None

    def start(self) -> "Stream":
        self.next_chunk()
        return self

    def next_chunk(self) -> None:
        self.timer = None
        if self.n < self.chunks:
            now = self.loop.time()  # time.monotonic(), as the reader's clock
            self.write(b'{"n": %d, "t": %r, "r": %r}' % (self.n, now, self.received))
            self.n += 1
        if self.n < self.chunks:
            self.timer = self.loop.call_at(self.received + self.n * self.interval, self.next_chunk)
        elif not self.hold:
            self.end()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


# --- jsonl ------------------------------------------------------------------------------


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


class JsonLines(asyncio.Protocol):
    """The daemon's side of a jsonl model: predict lines start streams, cancel lines stop them."""

    def __init__(self, loop, stopped):
        self.loop = loop
        self.stopped = stopped
        self.pending = b""
        self.streams = {}

    def connection_made(self, transport):
        write_all(b'{"ready": true}\n')

    def data_received(self, data):
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            if line.strip():
                self.line(line)

    def line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            wire_id = message["id"]
        except (ValueError, KeyError, TypeError):
            return
        if message.get("op") == "cancel":
            stream = self.streams.pop(wire_id, None)
            if stream is not None:
                stream.cancel()
            return
        if message.get("op") != "predict":
            return
        head = b'{"id": ' + json.dumps(wire_id).encode()
        try:
            chunks, interval, hold = parse_input(message.get("input"))
        except ValueError as e:
            write_all(head + b', "error": ' + json.dumps({"message": str(e), "status": 400}).encode() + b"}\n")
            return

        def chunk(payload: bytes) -> None:
            write_all(head + b', "chunk": ' + payload + b"}\n")

        def end() -> None:
            self.streams.pop(wire_id, None)
            write_all(head + b', "done": true}\n')

        stream = self.streams[wire_id] = Stream(self.loop, chunks, interval, hold, chunk, end)
        stream.start()

    def connection_lost(self, exc):
        for stream in self.streams.values():
            stream.cancel()
        if not self.stopped.done():
            self.stopped.set_result(None)


async def serve_jsonl() -> None:
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()
    await loop.connect_read_pipe(lambda: JsonLines(loop, stopped), sys.stdin)
    await stopped


# --- HTTP -------------------------------------------------------------------------------


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def plain(status: str, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Http(asyncio.Protocol):
    """One client connection, keep-alive: a request at a time (no pipelining)."""

    def __init__(self, loop):
        self.loop = loop
        self.buffer = b""
        self.stream = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        if self.stream is None:
            self.request()

    def request(self) -> None:
        at = self.buffer.find(b"\r\n\r\n")
        if at < 0:
            if len(self.buffer) > MAX_HEAD:
                self.refuse("431 Request Header Fields Too Large", "headers too large")
            return
        lines = self.buffer[:at].decode("latin-1").split("\r\n")
        method = lines[0].split(" ", 1)[0]
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    return self.refuse("400 Bad Request", "bad Content-Length")
            elif key == "transfer-encoding":
                return self.refuse("400 Bad Request", "send the body with a Content-Length")
        if length > MAX_BODY:
            return self.refuse("413 Payload Too Large", "body too large")
        if len(self.buffer) < at + 4 + length:
            return
        body = self.buffer[at + 4: at + 4 + length]
        self.buffer = self.buffer[at + 4 + length:]
        if method != "POST":
            self.transport.write(plain("200 OK", b'{"ok": true, "model": "stream-source"}'))
            return self.request() if self.buffer else None
        try:
            chunks, interval, hold = parse_input(json.loads(body or b"{}"))
        except ValueError as e:
            self.transport.write(plain("400 Bad Request", json.dumps({"error": str(e)}).encode()))
            return self.request() if self.buffer else None
        transport = self.transport
        self.transport.write(SSE_HEAD)

        def chunk(payload: bytes) -> None:
            event = b"data: " + payload + b"\n\n"
            transport.write(b"%x\r\n%s\r\n" % (len(event), event))

        self.stream = Stream(self.loop, chunks, interval, hold, chunk, self.ended)
        self.stream.start()

    def ended(self) -> None:
        self.stream = None
        self.transport.write(b"0\r\n\r\n")
        if self.buffer:
            self.request()

    def refuse(self, status: str, message: str) -> None:
        self.transport.write(plain(status, json.dumps({"error": message}).encode()))
        self.transport.close()

    def connection_lost(self, exc):
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


async def serve_http(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(loop), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--jsonl", action="store_true", help="speak jsonl on stdin/stdout (a subprocess model)")
    mode.add_argument("--port", type=int, help="serve Server-Sent Events over HTTP on this port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    if args.jsonl:
        asyncio.run(serve_jsonl())
    else:
        asyncio.run(serve_http(args.host, args.port))


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
