"""The one way skinclf parses JSON it did not write (a `serve` request's `metadata` field):
bounded in size and nesting before the parser sees it, so a hostile body is one SkinclfError
(a 422 from serve), never a RecursionError or a parser eating memory."""

from __future__ import annotations

import json
from typing import Any

from skinclf.errors import SkinclfError

MAX_BYTES = 64 * 1024  # a serve form field's own limit (`web.uploads`)
MAX_DEPTH = 8  # metadata is a list or object of objects: 3 levels; 8 leaves room and nothing more


def nesting_depth(text: str) -> int:
    """How deep `[` and `{` nest in `text`, outside strings (linear, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, *, what: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """`text` parsed as JSON, or one SkinclfError naming `what` (too large, too deep, malformed)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise SkinclfError(f"{what}: {size:,} bytes of JSON, over the limit of {max_bytes:,}")
    if nesting_depth(text) > max_depth:
        raise SkinclfError(f"{what}: JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SkinclfError(f"{what}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
