"""A model written with aibackend.worker (protocol "jsonl"): word statistics of a text."""
from collections import Counter

from aibackend.worker import BadInput, serve


def predict(data):
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise BadInput('send {"text": "..."}')
    words = data["text"].lower().split()
    return {"words": len(words), "unique": len(set(words)), "top": Counter(words).most_common(3)}


if __name__ == "__main__":
    serve(predict, concurrency=4)
