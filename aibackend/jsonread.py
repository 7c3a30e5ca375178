"""
Reading JSON that comes from outside the daemon (clients, and the answers of models it
reads itself), strictly and within bounds.

Python's C{json} recurses once per level of nesting: a document nested about a thousand
levels deep makes it (or C{json.dumps}, or C{repr}, later) raise C{RecursionError}
instead of an answer. So a document the parser could not read for its depth is refused,
and one it could read is measured, cheaply (a few C-level passes over the bytes, only
when it holds more brackets than the limit), and refused when it is nested deeper than
L{MAX_JSON_DEPTH}: whatever walks a document the daemon has read has stack to spare.
"""

from __future__ import annotations

import json
from itertools import accumulate

# Deeper than this is refused; no real model input or configuration comes close.
MAX_JSON_DEPTH = 512

# Every byte but the quote and the brackets: what the depth count drops.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
# A bracket's step in depth, indexed by byte.
_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


class JSONProblem(ValueError):
    """The text is not JSON the daemon reads (the message says why, for the client)."""


def too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """
    Is C{data} (JSON text) nested deeper than C{limit}? Exact for JSON; for text that is
    not JSON the answer only has to be safe, as the parser refuses it anyway.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # Escaped backslashes and quotes first (left to right, as a parser pairs them), then
    # the strings: what is left between quotes is inside a string.
    structure = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    outside = b"".join(structure.split(b'"')[::2])
    # The depth after each bracket; the first past the limit ends the scan (all C-level).
    return next(filter(limit.__lt__, accumulate(map(_STEP.__getitem__, outside))), None) is not None


def _nested_too_deep(what: str) -> JSONProblem:
    return JSONProblem(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels; the daemon reads JSON "
                       f"up to {MAX_JSON_DEPTH} levels deep")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def read_json(data: bytes, what: str = "the request body"):
    """
    Parse strict JSON (UTF-8, no NaN or Infinity, at most L{MAX_JSON_DEPTH} deep).

    @param what: what the text is, for the message (C{"the request body"}).
    @raise JSONProblem: with what is wrong and where.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONProblem(f"{what} is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise JSONProblem(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise _nested_too_deep(what) from None
    except ValueError as e:  # NaN or Infinity, an integer of too many digits
        raise JSONProblem(f"{what} is not valid JSON: {e}") from None
    # Measured once it is known to be JSON: text that is not is refused at its first
    # mistake, without a pass over all of it.
    if too_deep(data):
        raise _nested_too_deep(what)
    return value
