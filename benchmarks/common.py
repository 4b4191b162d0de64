"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import argparse
import re


def file_safe(part: str) -> str:
    """``part`` of a file name: characters no file name may hold (the '/' of ALE/Pong-v5, ':' of a
    module-qualified id, Windows' reserved ones) become '-'; a part without them is kept as it is, so earlier
    runs' file names do not change."""
    return re.sub(r'[/\\:*?"<>|\x00-\x1f]+', "-", part)


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text!r}")
    return value
