"""
A streaming text generator written with aibackend.worker (protocol "jsonl"): a word-level
Markov chain of order 2, trained at load on the text below (it ships with the model: no
download). Its predict is a generator, so the answer streams: one chunk per word, as the
words are made.

    curl -N -H 'Accept: text/event-stream' \\
         -d '{"prompt": "the daemon", "max_words": 30}' 'http://127.0.0.1:8080/post/predict?id=generate'

Input: {"prompt": "...", "max_words": 40, "seed": 7, "delay": 0.05}; every key may be left
out. "text_input" is another name for "prompt" (the name the Open Inference Protocol's
generate extension gives it: /v2/models/generate/generate_stream takes
{"text_input": "the daemon", "parameters": {"max_words": 30}}); give one or the other.
The text goes on from the prompt's last two words, or, if the model does not know
them, from two opening words of its own, followed by "max_words" more (1 to 200). "delay"
is the seconds between two words (0 to 1), so that a client can watch them arrive; "seed"
makes the words the same each time.
"""

import random
import re
import time
from collections import Counter, defaultdict

from aibackend.worker import BadInput, serve

# What the model learns from: a few paragraphs about what it runs in.
TEXT = """
The daemon stands in front of every model a team runs. A client sends a request to the
daemon, and the daemon sends it on to the model that the request names. The model answers,
and the daemon gives the answer back to the client. A slow model never holds up another
model, because the daemon waits for every model at once.

A model may be a server that answers over HTTP, or a program that the daemon starts and
watches. When a program crashes, the daemon starts it again after a short wait, and the wait
grows when the program keeps crashing. When a program hangs, the daemon stops it and starts
another. The daemon keeps a log for every model, and the log says what the model did and
when it did it.

A model that writes text may answer word by word. The daemon sends each word to the client
as soon as the model writes it, so the client reads the first word long before the model has
written the last one. When the client reads slowly, the daemon asks the model to wait. When
the client goes away, the daemon tells the model to stop, and the model stops its work.

The team writes one configuration file, and the daemon serves every model in it. The team
adds a model while the daemon runs, and the daemon keeps the new model when it starts again.
The daemon answers every bad request with a clear error, and it never answers one client
with the words of another.
"""

ORDER = 2
MAX_WORDS = 200


class Generator:
    def load(self):
        words = re.findall(r"[A-Za-z']+|[.,]", TEXT)
        self.chain = defaultdict(list)
        for i in range(len(words) - ORDER):
            self.chain[tuple(w.lower() for w in words[i:i + ORDER])].append(words[i + ORDER])
        self.starts = [key for key in self.chain if key[0] in ("the", "a")]

    def predict(self, data):
        if not isinstance(data, dict):
            raise BadInput('send {"prompt": "...", "max_words": 40}')
        if "prompt" in data and "text_input" in data:
            raise BadInput("give the prompt as prompt or as text_input, not both")
        prompt = data.get("prompt", data.get("text_input", ""))
        max_words = data.get("max_words", 40)
        delay = data.get("delay", 0.05)
        if not isinstance(prompt, str):
            raise BadInput(f"{'prompt' if 'prompt' in data else 'text_input'} must be a string")
        if not isinstance(max_words, int) or isinstance(max_words, bool) or not 1 <= max_words <= MAX_WORDS:
            raise BadInput(f"max_words must be a whole number from 1 to {MAX_WORDS}")
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= 1:
            raise BadInput("delay must be a number of seconds from 0 to 1")
        return self.words(prompt, max_words, delay, random.Random(data.get("seed")))

    def words(self, prompt, max_words=None, delay=0.0, rng=random, temperature=1.0):
        """
        The text going on from C{prompt}, a word at a time (with the space before it, so
        that the pieces joined are the text): C{max_words} of them after the opening, or
        without end if None. C{temperature} 1 picks each word as often as it follows the
        last two in the text, 0 always the most frequent, above 1 evens the odds out.
        (examples/chat.py speaks through this too.)
        """
        # A generator: aibackend.worker sends each piece as it is yielded, and closes the
        # generator if the client goes away (the loop ends there).
        state = tuple(re.findall(r"[A-Za-z']+", prompt.lower())[-ORDER:])
        first = True
        if state not in self.chain:
            state = rng.choice(self.starts)
            for word in state:
                yield word if first else " " + word
                first = False
        made = 0
        while max_words is None or made < max_words:
            made += 1
            following = self.chain.get(state)
            if not following:
                state = rng.choice(self.starts)
                following = self.chain[state]
            word = rng.choice(following) if temperature == 1 else self._pick(following, temperature, rng)
            if delay:
                time.sleep(delay)
            yield word if first or word in ".," else " " + word
            first = False
            state = (state[1], word.lower())

    @staticmethod
    def _pick(following, temperature, rng):
        counts = Counter(following)  # in the order the words first follow: ties go to the first
        if temperature == 0:
            return max(counts, key=counts.get)
        words = list(counts)
        return rng.choices(words, [counts[w] ** (1 / temperature) for w in words])[0]


if __name__ == "__main__":
    serve(Generator(), concurrency=4)
