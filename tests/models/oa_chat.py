"""
A small chat and completion model written with aibackend.worker, for tests/test_openai_daemon.py
(the adapted side of the OpenAI-compatible API, aibackend.openai_api).

It gets the OpenAI request without model/stream/stream_options: C{messages} (a chat) or
C{prompt} (a completion) and the parameters. Its answer is "You said: " and the last
message's (or the prompt's) words, one chunk per word (a generator: it streams), at most
C{max_tokens} words (then finish_reason "length"), C{temperature} seconds apart (a test's
way to pace it). It ends with C{{"content": the whole text, "finish_reason", "usage"}},
usage counted as words, for a chat; a completion's end gives no usage (the front door
estimates it). The text "fail" raises (a 500); "break" raises after its first word
(an error mid-stream); "forever" yields words until it is cancelled.
"""

import time

from aibackend.worker import BadInput, serve


def predict(data):
    if "messages" in data:
        content = data["messages"][-1].get("content")
        chat = True
    elif "prompt" in data:
        content = data["prompt"]
        chat = False
    else:
        raise BadInput("send messages or a prompt")
    if not isinstance(content, str):
        raise BadInput("the last message's content must be a string")
    if content == "fail":
        raise RuntimeError("the model failed on purpose")
    return _words(content, data.get("max_tokens") or data.get("max_completion_tokens") or 100,
                  float(data.get("temperature") or 0), chat, len(content.split()))


def _words(content, limit, pause, chat, prompt_words):
    forever = content == "forever"
    words = ["You", "said:"] + content.split()
    sent = []
    n = 0
    while forever or n < len(words):
        if not forever and len(sent) >= limit:
            break
        word = words[n % len(words)]
        piece = word if n == 0 else " " + word
        sent.append(piece)
        yield piece
        if content == "break":
            raise RuntimeError("the model broke mid-stream")
        n += 1
        if pause:
            time.sleep(pause)
    finish = "length" if len(sent) < len(words) else "stop"
    end = {"content": "".join(sent), "finish_reason": finish}
    if chat:
        end["usage"] = {"prompt_tokens": prompt_words, "completion_tokens": len(sent)}
    return end


serve(predict)
