#!/usr/bin/env python3
"""
A small HTTP model server, the kind aibackend puts behind its front door.

    python examples/http_model_server.py --listen tcp:9001:interface=127.0.0.1

Routes (all JSON):
  POST /sentiment   {"text": "what a great day"} -> {"label": "positive", "score": 0.67, ...}
  POST /echo        any JSON -> {"echo": <it>, "request_id": <X-Request-Id received>}
  GET  /health      {"status": "ok"}

It prints "listening on http://HOST:PORT" once it listens (port 0 picks a free one).
"""

import argparse
import json
import re
import sys

from twisted.internet import endpoints, reactor
from twisted.web import resource, server

POSITIVE = {
    "good", "great", "excellent", "love", "loved", "wonderful", "happy", "nice", "best",
    "fantastic", "amazing", "like", "enjoy", "enjoyed", "pleasant", "superb", "brilliant",
}
NEGATIVE = {
    "bad", "terrible", "awful", "hate", "hated", "horrible", "sad", "worst", "poor",
    "boring", "disappointing", "ugly", "angry", "broken", "slow", "annoying",
}
NEGATIONS = {"not", "no", "never", "hardly", "isn't", "wasn't", "don't", "didn't"}
WORD = re.compile(r"[a-z']+")


def sentiment(text):
    """A lexicon model: counts positive and negative words, flipping after a negation."""
    words = WORD.findall(text.lower())
    positive, negative = [], []
    for index, word in enumerate(words):
        negated = index > 0 and words[index - 1] in NEGATIONS
        if word in POSITIVE:
            (negative if negated else positive).append(word)
        elif word in NEGATIVE:
            (positive if negated else negative).append(word)
    total = len(positive) + len(negative)
    score = 0.0 if total == 0 else (len(positive) - len(negative)) / total
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return {"label": label, "score": round(score, 3), "positive": positive, "negative": negative}


class JSONRoute(resource.Resource):
    isLeaf = True

    def __init__(self, handler, methods):
        super().__init__()
        self.handler = handler
        self.methods = methods

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        if request.method not in self.methods:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(self.methods))
            return json.dumps({"error": "method not allowed"}).encode()
        try:
            payload = json.loads(request.content.read() or b"null")
        except ValueError:
            request.setResponseCode(400)
            return json.dumps({"error": "the body is not JSON"}).encode()
        status, answer = self.handler(payload, request)
        request.setResponseCode(status)
        return json.dumps(answer).encode()


def handle_sentiment(payload, request):
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        return 400, {"error": 'send {"text": "..."}'}
    return 200, sentiment(payload["text"])


def handle_echo(payload, request):
    request_id = request.getHeader(b"x-request-id")
    return 200, {"echo": payload, "request_id": request_id.decode() if request_id else None}


def handle_health(payload, request):
    return 200, {"status": "ok"}


def make_site():
    root = resource.Resource()
    root.putChild(b"sentiment", JSONRoute(handle_sentiment, [b"POST"]))
    root.putChild(b"echo", JSONRoute(handle_echo, [b"POST"]))
    root.putChild(b"health", JSONRoute(handle_health, [b"GET"]))
    return server.Site(root)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="tcp:9001:interface=127.0.0.1", help="a Twisted endpoint")
    args = parser.parse_args(argv)

    def listening(port):
        address = port.getHost()
        print(f"listening on http://{address.host}:{address.port}", flush=True)

    def failed(failure):
        print(f"cannot listen on {args.listen}: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    endpoint = endpoints.serverFromString(reactor, args.listen)
    endpoint.listen(make_site()).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
