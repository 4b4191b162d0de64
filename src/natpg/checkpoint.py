"""Checkpoints: one file, written atomically, loaded without executing code, checked for corruption.

A checkpoint is a single ``model.pt`` holding tensors (policy, critic, optimiser state, random generator
states) and a JSON string of metadata (format version, algorithm, environment, config, spaces,
normaliser statistics, counters, sampler and environment state). It is written to a temporary file in
the same directory, flushed and fsynced, then renamed over the old one (and the directory fsynced), so
a crash at any moment leaves either the previous or the new checkpoint, never half of one. It is read
with ``torch.load(weights_only=True)``, which refuses pickled code, and its content is compared with
a SHA-256 digest stored inside (version 2), so a truncated or corrupted file is an error, never
silently different weights. One process writes a given checkpoint at a time.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import stat
import tempfile
import threading
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from .config import is_path
from .errors import first_line

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None

FORMAT = "natpg-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no digest
FILENAME = "model.pt"
# The other files natpg writes in a run directory, and the ones --overwrite may delete (RUN_OUTPUTS).
CONFIG_JSON, PROGRESS_CSV, EPISODES_CSV, EVENTS_LOG = "config.json", "progress.csv", "episodes.csv", "events.log"
TENSORBOARD_DIR, BEST_DIR = "tb", "best"
RUN_OUTPUTS = (FILENAME, CONFIG_JSON, PROGRESS_CSV, EPISODES_CSV, EVENTS_LOG, TENSORBOARD_DIR, BEST_DIR)


def is_file_path(path: str | os.PathLike) -> bool:
    """A path ending in '.pt' names one checkpoint file; any other path, a run directory."""
    return os.fspath(path).endswith(".pt")


def checkpoint_file(path: str) -> str:
    """A path ending in '.pt' is the file itself; anything else is a directory holding model.pt."""
    if not is_path(path):
        raise ValueError(f"a checkpoint path must be a directory or a .pt file name, got {path!r}")
    path = os.fspath(path)
    return path if is_file_path(path) else os.path.join(path, FILENAME)


def digest(meta_json: str, tensors: dict[str, Any]) -> str:
    """SHA-256 over the metadata string and every tensor's dtype, shape and bytes (and every other leaf's repr),
    walking nested dicts/lists in a fixed order."""
    h = hashlib.sha256(meta_json.encode())

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(tensors)
    return h.hexdigest()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask. Linux shows it in /proc without changing it; elsewhere it is read by setting a strict
    one and putting it back at once (a file another thread creates meanwhile gets 0600, never more)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _open_mode(file: str) -> int:
    """The permissions ``open(file, 'w')`` would leave: an existing file's own, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(file).st_mode) & 0o777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def signals_held(what: str):
    """SIGINT and SIGTERM that arrive in the block take their course once it is done, each one in the order they
    came (also when the block raised): the block writes ``what`` (a checkpoint: seconds at most), which a second
    Ctrl-C would otherwise leave unwritten, the previous one in its place. Outside the main thread, or with a
    handler not set from Python, signals are left as they are."""
    held = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, held):
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in held}
    written = False
    try:
        yield
        written = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raised = None
        for signum in arrived:  # their own handlers now: Ctrl-C's KeyboardInterrupt, natpg train's stop, ...
            try:
                signal.raise_signal(signum)
            except BaseException as exc:  # the first to raise goes on; the later ones' handlers still run
                if raised is None:
                    exc.add_note(f"natpg: {signal.Signals(signum).name} came while {what} was written; "
                                 f"{'it was written in full first' if written else 'the write failed'}")
                    raised = exc
        if raised is not None:
            raise raised


def atomic_write(file: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(file))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"cannot write {file!r}: {directory!r} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    prefix = f".{os.path.basename(file)}.tmp-"
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")):
        try:  # left behind by a writer that was killed mid-write
            os.unlink(stale)
        except OSError:
            pass
    mode = _open_mode(file)
    with signals_held(file):
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.chmod(tmp, mode)  # mkstemp makes it 0600 whatever the umask: others could not read a shared run
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, file)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)


def write(path: str, meta: dict[str, Any], tensors: dict[str, Any]) -> str:
    """Write (meta, tensors) atomically to ``path``; returns the file written."""
    file = checkpoint_file(path)
    meta_json = json.dumps(meta)
    payload = {"format": FORMAT, "version": VERSION, "meta": meta_json, "sha256": digest(meta_json, tensors),
               **tensors}
    try:
        atomic_write(file, lambda f: torch.save(payload, f))
    except RuntimeError as exc:  # torch.save reports a full disk as "[enforce fail at inline_container.cc] ..."
        if not isinstance(exc.__context__, OSError):
            raise
        raise OSError(f"cannot write checkpoint {file!r}: {exc.__context__}") from exc
    return file


def write_json(file: str, obj: Any) -> None:
    """Write a JSON file atomically (same temp-file-and-rename discipline as the checkpoint); a file that
    already holds exactly this content is left alone."""
    data = json.dumps(obj, indent=2).encode()
    try:
        with open(file, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    atomic_write(file, lambda f: f.write(data))


def read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, tensors) of a checkpoint, or a clear error: missing, truncated, corrupted or foreign file."""
    file = checkpoint_file(path)
    if not os.path.exists(file):
        hint = " (a directory without model.pt: not a natpg run, or one killed before its first checkpoint)" \
            if os.path.isdir(path) else ""
        raise FileNotFoundError(f"no natpg checkpoint at {path!r} (looked for {file!r}){hint}")
    if os.path.isdir(file):
        raise ValueError(f"{file!r} is a directory, not a natpg checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign file's pickle protocol: the error says it
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign or malicious content
        # torch's own text suggests weights_only=False, i.e. running the file's code: not advice to pass on.
        detail = "" if "weights_only" in str(exc) or not first_line(exc) else f": {first_line(exc)}"
        raise ValueError(f"{file!r} is not a readable natpg checkpoint (truncated or corrupted, or not tensors "
                         f"only): {type(exc).__name__}{detail}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{file!r} is not a natpg checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{file!r} has checkpoint version {payload.get('version')!r}; this natpg reads "
                         f"versions {list(READABLE_VERSIONS)}")
    meta_json = payload.pop("meta")
    expected = payload.pop("sha256", None)
    tensors = {k: v for k, v in payload.items() if k not in ("format", "version")}
    if not isinstance(meta_json, str):
        raise ValueError(f"{file!r} is corrupted: its metadata is not a string")
    if payload["version"] >= 2 and expected != digest(meta_json, tensors):
        raise ValueError(f"{file!r} is corrupted: its content does not match the SHA-256 digest stored inside "
                         f"(truncated or corrupted?)")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file!r} is corrupted: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file!r} is corrupted: its metadata is not a JSON object")
    return meta, tensors


LOCK_FILE = ".natpg.lock"
# real path of a run directory this process has locked → (its lock file descriptor, the thread holding it)
_held_locks: dict[str, tuple[int, int]] = {}
_held_locks_guard = threading.Lock()


@contextlib.contextmanager
def run_dir_lock(directory: str, shared: bool = False):
    """Hold ``directory``'s lock while this process writes a run there, so that a second writer (the same
    ``--resume`` started twice, or a second agent in another thread) is refused — naming the first one — instead of
    interleaving its log rows and checkpoints with the first's. An flock on DIR/.natpg.lock: released however the
    process ends, so never stale; nested use within one thread is fine. Where there is no fcntl (Windows) nothing
    is locked. ``shared``: a reader's lock (``--resume DIR --out NEW`` reading DIR), refused while a writer holds
    DIR, beside any number of other readers."""
    if fcntl is None:
        yield
        return
    if shared:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise _held_by_writer(directory, fd, "wait for it to end (or stop it) before reading it") from None
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    os.makedirs(directory, exist_ok=True)
    key = os.path.realpath(directory)
    me = threading.get_ident()
    with _held_locks_guard:
        holder_thread = _held_locks[key][1] if key in _held_locks else None
        if holder_thread is None:
            fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                refused = _held_by_writer(directory, fd, "one writer per run directory; wait for it to end (or stop "
                                                         "it), or use another directory")
                os.close(fd)
                if _only_read(directory):
                    raise ValueError(f"{directory!r} is being read by another natpg process (a --resume of it into "
                                     f"another --out): wait a moment, until it has read it") from None
                raise refused from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            _held_locks[key] = fd, me
    if holder_thread == me:  # an outer use holds it (natpg train around learn)
        yield
        return
    if holder_thread is not None:
        raise ValueError(f"{directory!r} is in use by another natpg writer in this process (thread "
                         f"{_thread_name(holder_thread)}) writing a run there: one writer per run directory; wait "
                         f"for it to end, or use another directory")
    try:
        yield
    finally:
        with _held_locks_guard:
            del _held_locks[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _held_by_writer(directory: str, fd: int, advice: str) -> ValueError:
    """The refusal while another process writes a run in ``directory``, naming it by the pid it wrote into the lock
    file ``fd``."""
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return ValueError(f"{directory!r} is in use by another natpg process (pid {holder}) writing a run there: {advice}")


def _only_read(directory: str) -> bool:
    """Whether the lock on ``directory`` that refused a writer is held by readers only (a shared lock is granted)."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _thread_name(ident: int) -> str:
    return next((t.name for t in threading.enumerate() if t.ident == ident), str(ident))


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """A JSON-able record of a space (Box, Discrete, MultiDiscrete, MultiBinary, Dict, Tuple)."""
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(),
                "shape": list(space.shape), "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist(),
                "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": [[k, space_to_dict(v)] for k, v in space.spaces.items()]}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_dict(v) for v in space.spaces]}
    raise ValueError(f"cannot record space {space}")


def space_from_dict(d: dict[str, Any]) -> gym.Space:
    kind = d["type"]
    if kind == "Box":
        return gym.spaces.Box(np.array(d["low"], dtype=d["dtype"]), np.array(d["high"], dtype=d["dtype"]),
                              dtype=d["dtype"])
    if kind == "Discrete":
        return gym.spaces.Discrete(d["n"], start=d["start"])
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(np.array(d["nvec"]), dtype=d["dtype"], start=np.array(d["start"]))
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(d["n"])
    if kind == "Dict":
        # pairs, not a dict: gym.spaces.Dict sorts a plain dict's keys, and flattening follows the env's own order
        return gym.spaces.Dict([(k, space_from_dict(v)) for k, v in d["spaces"]])
    if kind == "Tuple":
        return gym.spaces.Tuple([space_from_dict(v) for v in d["spaces"]])
    raise ValueError(f"unknown space type {kind!r} in checkpoint")
