"""
A small embedding model written with aibackend.worker, for tests/test_openai_daemon.py:
C{{"input": [text, ...], "dimensions"?: n}} -> C{{"embeddings": [[...], ...], "usage"}}, one
vector per text: its length, its words, its vowels, then zeros up to C{dimensions} (3 unless
given), made unit length. With C{"user": "bare"} it answers the bare list of vectors, without
usage (the front door then estimates it).
"""

import math

from aibackend.worker import BadInput, serve


def predict(data):
    texts = data.get("input")
    if not isinstance(texts, list):
        raise BadInput("send {\"input\": [text, ...]}")
    dimensions = data.get("dimensions", 3)
    vectors = []
    for text in texts:
        vector = [float(len(text)), float(len(text.split())), float(sum(c in "aeiou" for c in text))]
        vector = (vector + [0.0] * dimensions)[:dimensions]
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        vectors.append([x / norm for x in vector])
    if data.get("user") == "bare":
        return vectors
    return {"embeddings": vectors, "usage": {"prompt_tokens": sum(len(t.split()) for t in texts)}}


serve(predict)
