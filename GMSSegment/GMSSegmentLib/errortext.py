"""Error messages on one line: the text of an exception, and the useful part of a SimpleITK/ITK exception (shared by
the readers in ``imageio`` and the writers in ``atomicfile`` / ``labelwrite``; imports nothing of the engine)."""
from __future__ import annotations

import re
from typing import Any


def one_line(text: Any, limit: int | None = 300) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if limit is None or len(s) <= limit else s[: limit - 3] + "..."


def sitk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK/ITK exception message, on one line."""
    msg = one_line(exc, limit=10_000)
    for marker in ("ERROR:", "Description:"):
        if marker in msg:
            msg = msg.rsplit(marker, 1)[1].strip()
    msg = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", msg)  # "PNGImageIO(0x55d...): " prefix
    return one_line(msg, limit=200) or type(exc).__name__
