"""
The limits of a client key or of a model: requests per minute, tokens per minute and
concurrent requests.

L{Limits} is what a key (L{aibackend.keys}) or a model's C{[models.limits]} table says;
L{parse_limits} reads one from a plain table (an C{addkey} body's C{limits}, a stored key)
with a clear message for each wrong value.
"""

from __future__ import annotations

from dataclasses import dataclass

# The names of a limits table, and what each bounds.
LIMIT_KEYS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute (models whose answers carry token usage)",
    "max_concurrent": "requests in flight at once",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """
    What a key or a model may do; None for a limit not set.

    @ivar rpm: requests per minute.
    @ivar tpm: tokens per minute.
    @ivar max_concurrent: requests in flight at once.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def any(self) -> bool:
        """Is any limit set?"""
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

    def table(self) -> dict:
        """The limits set, as a plain table (what L{parse_limits} reads back)."""
        return {name: value for name in LIMIT_KEYS if (value := getattr(self, name)) is not None}


def parse_limits(table, where: str = "limits") -> Limits:
    """
    Read a limits table: each of L{LIMIT_KEYS} a whole number of at least 1, or absent.

    @param where: what the table is, for the messages (C{"limits"}, C{"models.limits"}).
    @raise ValueError: the table is wrong; the message names the key and says why.
    """
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of {', '.join(LIMIT_KEYS)}, not {type(table).__name__}")
    unknown = sorted(name for name in table if name not in LIMIT_KEYS)
    if unknown:
        raise ValueError(f"{where} has no key {unknown[0]!r}: its keys are {', '.join(LIMIT_KEYS)}")
    values = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name} ({LIMIT_KEYS[name]}) must be a whole number of at least 1, "
                             f"not {value!r}")
        values[name] = value
    return Limits(**values)
