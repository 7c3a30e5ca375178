"""
Reading JSON that comes from outside the daemon (clients, and the answers of models it
reads itself), strictly and within bounds: L{read_json} for what the daemon reads and
walks, L{model_json} for the answer of any model, HTTP or subprocess (one rule for both).

Python's C{json} recurses once per level of nesting: a document nested about a thousand
levels deep makes it (or C{json.dumps}, or C{repr}, later) raise C{RecursionError}
instead of an answer. So a document the parser could not read for its depth is refused,
and one it could read is measured, cheaply (a few C-level passes over the bytes, only
when it holds more brackets than the limit), and refused when it is nested deeper than
L{MAX_JSON_DEPTH}: whatever walks a document the daemon has read has stack to spare.
"""

from __future__ import annotations

import json
import math
from itertools import accumulate

import orjson

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


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"{text[:40]} is too large for a double")
    return value


def read_json(data: bytes, what: str = "the request body", *, finite: bool = False):
    """
    Parse strict JSON (UTF-8, no NaN or Infinity, at most L{MAX_JSON_DEPTH} deep).

    @param what: what the text is, for the message (C{"the request body"}).
    @param finite: refuse numbers too large for a double too (C{1e999}, which json reads
        as infinity): for a document the daemon writes out again, which would then
        hold C{Infinity}.
    @raise JSONProblem: with what is wrong and where.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONProblem(f"{what} is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float if finite else None)
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


# Why a model's answer is not one a client can read: the end of "model 'm' ...".
NOT_UTF8 = "answered something that is not UTF-8 text"
NOT_FINITE = "answered JSON with NaN or Infinity, which clients cannot parse"
NOT_JSON = "answered something that is not JSON"
TOO_DEEP = "answered JSON nested too deeply to be read"


class NotClientJSON(ValueError):
    """A model's answer no client could read; its text is one of the C{NOT_*}/C{TOO_DEEP} reasons."""

    @property
    def reason(self) -> str:
        return self.args[0]

    @property
    def is_json(self) -> bool:
        """JSON to a lax reader (NaN, Infinity, too deep): an answer, but a broken one."""
        return self.reason in (NOT_FINITE, TOO_DEEP)


class _NotFinite(ValueError):
    pass


def _not_finite(name):
    raise _NotFinite(name)


def model_json(data: bytes):
    """
    The document a model answered, read as strictly as clients read it: UTF-8, no C{NaN}
    or C{Infinity}, and within the parser's depth.

    orjson first: it is fast, and as strict, so an ordinary answer costs one C parse.
    What it refuses is read again by json, whose word is final (orjson refuses some JSON:
    integers past 64 bits, numbers that overflow a double); never with a guessed
    encoding (json.loads of bytes takes UTF-16 too).

    @raise NotClientJSON: saying why.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NotClientJSON(NOT_UTF8) from None
    try:
        return json.loads(text, parse_constant=_not_finite)
    except _NotFinite:
        raise NotClientJSON(NOT_FINITE) from None
    except RecursionError:
        raise NotClientJSON(TOO_DEEP) from None
    except ValueError:
        raise NotClientJSON(NOT_JSON) from None
