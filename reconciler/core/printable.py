"""Text from files, stores and servers made safe to print on a terminal.

A file name, an id, an error message or a live value may hold a newline, a
carriage return, an ANSI escape or a bidirectional override. Printed as it
is into a text view (``validate``, ``status``, a plan, ``apply``'s lines, a
console log line) it could forge a line of its own, recolour or rewrite the
screen, or reorder what is shown. :func:`printable` escapes such characters
the way Python writes them in a string literal (``\\n``, ``\\x1b``,
``\\u202e``), so the text stays one line and shows what is really there.

Only the text views use it: JSON output already escapes control characters
(and keeps every value exactly), and the dashboard's HTML is escaped by its
templates.
"""

from __future__ import annotations

import re
from typing import Final

#: C0 and C1 control characters (tab, newline and ESC among them), DEL, the line
#: and paragraph separators, and the bidirectional marks, embeddings,
#: overrides and isolates that reorder the text around them.
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_SHORT: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``str(text)`` with every control or reordering character escaped (see above)."""
    return _UNSAFE.sub(_escape, str(text))
