"""
A chat model written with aibackend.worker's chat helper (protocol "jsonl"): the `generate`
example's Markov chain (examples/generate.py, trained at load on the text it ships) answering
the last user message, a word at a time. Through the OpenAI-compatible API:

    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "the daemon"}])

or through /post/predict, with the body that API sends it (README "Chat models"):

    curl -s -d '{"messages": [{"role": "user", "content": "the daemon"}], "max_tokens": 8, "seed": 7}' \\
         'http://127.0.0.1:8080/post/predict?id=chat'
    # {"content": "asks the model that the request names.", "finish_reason": "length",
    #  "usage": {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}}

The reply goes on from the last user message's last two words (or from two opening words of
its own when it does not know them). Honoured: max_tokens / max_completion_tokens (words,
1 to 200; 60 if not said), stop, seed (the same words each time), temperature (0: always the
most frequent next word; 1, the default, as often as it follows in the text; up to 2: the
odds evened out), n (1 only). Other parameters (top_p, user, ...) are accepted and have no
effect. The words come 20 ms apart, so that a streaming client can watch them arrive.
"""

import random

from generate import Generator  # examples/, the script's directory, is on sys.path

from aibackend.worker import BadInput, chat, serve

MAX_TOKENS = 200
DEFAULT_TOKENS = 60
DELAY = 0.02

generator = Generator()


@chat(max_tokens=MAX_TOKENS, default_tokens=DEFAULT_TOKENS)
def reply(messages, seed=None, temperature=1.0, n=1, **others):
    if n != 1:
        raise BadInput("n must be 1: this model answers one choice")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadInput("temperature must be a number from 0 to 2")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadInput("seed must be a whole number")
    users = [message["content"] for message in messages if message["role"] == "user"]
    return generator.words(users[-1] if users else "", None, DELAY, random.Random(seed), temperature)


class Chat:
    def load(self):
        generator.load()

    def predict(self, data):
        return reply(data)


if __name__ == "__main__":
    serve(Chat(), concurrency=4)
