#!/usr/bin/env python3
"""
The Python peer of the benchmark: a minimal aiohttp reverse proxy in front of one model.

    python bench/aiohttp_proxy.py --port 8081 --upstream http://127.0.0.1:8080

One process, asyncio's default event loop (not uvloop: aibackend runs on Twisted's default
epoll reactor, so this is the like-for-like peer), one ClientSession with one
TCPConnector(limit=...) reused for every request. Any method and path: the request body is
POSTed to the upstream (same path and query), and its status and body come back as JSON;
an answer of type text/event-stream is relayed piece by piece as it arrives (a
StreamResponse, chunked), for the benchmark's streaming cases. No access log.
"""

import argparse

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", ClientSession)
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def forward(request: web.Request) -> web.Response:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM] + request.rel_url.path_qs,
        data=body,
        headers={"Content-Type": "application/json"},
    ) as answer:
        if answer.content_type == "text/event-stream":
            # A stream (bench/stream_source.py): each piece written on as it comes.
            response = web.StreamResponse(status=answer.status, headers=STREAM_HEADERS)
            await response.prepare(request)
            async for data in answer.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response
        data = await answer.read()
        return web.Response(status=answer.status, body=data, content_type="application/json")


def make_app(upstream: str, limit: int) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_context(app):
        connector = TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=120)
        async with ClientSession(connector=connector, timeout=ClientTimeout(total=60)) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the model's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--limit", type=int, default=64, help="the connector's connection limit (default 64)")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream, args.limit), host=args.host, port=args.port,
                access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
