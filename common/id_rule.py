"""The one rule for external user and item ids accepted over HTTP, and the bounds on id lists in requests.

Every service checks ids with it (GET/POST /recall, POST /events, POST /items, GET /users|/items/{id}, the vector
server's /search bodies), so an id one endpoint accepts is one every other endpoint can take: at most MAX_ID_LEN
characters after trimming surrounding whitespace, no control characters, and no comma (GET /recall separates the
ids of `exclude` with commas, so an id with one could never be excluded there).
"""

from __future__ import annotations

import re
from typing import Any

MAX_ID_LEN = 256
MAX_EXCLUDE = 10_000  # excluded item ids per request (GET/POST /recall, the vector server's bodies)
MAX_RECENT = 1_000  # recent item ids a vector-server request may pass for the user
_BAD_RE = re.compile(r"[\x00-\x1f\x7f-\x9f,]")
RULE = f"1 to {MAX_ID_LEN} characters, no control characters, no comma"


class IdError(ValueError):
    """An id that breaks the rule; the message says which part (without the field name)."""


def check_id(value: Any) -> str:
    """The id as a string (integers accepted, whitespace trimmed); IdError naming the problem otherwise."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise IdError("must be a string or an integer")
    s = str(value).strip()
    if not s:
        raise IdError("must not be empty")
    if len(s) > MAX_ID_LEN:
        raise IdError(f"must be at most {MAX_ID_LEN} characters")
    bad = _BAD_RE.search(s)
    if bad:
        what = "a comma" if bad.group() == "," else f"a control character ({bad.group()!r})"
        raise IdError(f"must not contain {what} ({RULE})")
    return s


def check_ids(values: Any, limit: int) -> list[str]:
    """A list of ids (at most `limit`), each by `check_id`; IdError naming the position otherwise."""
    if not isinstance(values, list):
        raise IdError("must be a list of ids")
    if len(values) > limit:
        raise IdError(f"at most {limit} ids, got {len(values)}")
    if all(type(v) is str for v in values):  # the usual case, checked in one regex pass (request hot path)
        out = [v.strip() for v in values]
        if all(0 < len(s) <= MAX_ID_LEN for s in out) and not _BAD_RE.search(" ".join(out)):
            return out
    out = []
    for pos, v in enumerate(values):
        try:
            out.append(check_id(v))
        except IdError as exc:
            raise IdError(f"id at position {pos} {exc}") from None
    return out
