"""Checkpoints: one file, written atomically, loaded without executing code.

A checkpoint is a single ``model.pt`` holding tensors (policy, critic, optimiser state) and a JSON
string of metadata (format version, algorithm, environment, config, spaces, normaliser statistics,
counters). It is written to a temporary file, flushed and fsynced, then renamed over the old one,
so a crash leaves either the previous or the new checkpoint, never half of one. It is read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

FORMAT = "natpg-checkpoint"
VERSION = 1
FILENAME = "model.pt"


def checkpoint_file(path: str) -> str:
    """A path ending in '.pt' is the file itself; anything else is a directory holding model.pt."""
    return path if str(path).endswith(".pt") else os.path.join(path, FILENAME)


def write(path: str, meta: dict[str, Any], tensors: dict[str, Any]) -> str:
    file = checkpoint_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta), **tensors}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(os.path.abspath(file)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return file


def read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, tensors) of a checkpoint, or a clear error: missing, truncated, corrupted or foreign file."""
    file = checkpoint_file(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no natpg checkpoint at {path!r} (looked for {file!r})")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign content
        raise ValueError(f"{file!r} is not a readable natpg checkpoint (truncated or corrupted?): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{file!r} is not a natpg checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{file!r} has checkpoint version {payload.get('version')!r}; this natpg reads "
                         f"version {VERSION}")
    meta = json.loads(payload.pop("meta"))
    return meta, payload
