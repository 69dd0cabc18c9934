"""The trainer's run folder and checkpoints.

A checkpoint is a file ``torch.load(path, weights_only=True)`` reads (tensors, dicts, lists,
tuples, strings and numbers only: loading one never runs code), holding::

    {"format": "wgan_kernels.train", "version": 1, "sha256": <digest of state>, "state": {...}}

``state`` is the trainer's (models, optimizers, random generators, history) with the run's
settings; ``sha256`` is a digest of its contents (every tensor's dtype, shape and bytes, every
key and value), so a file that was overwritten in part is refused instead of resumed from.
Writes are atomic: the checkpoint goes to a temporary file named after the process, is flushed to
disk, then renamed over the old one; a write that fails (full disk, file too large) removes its
temporary file and leaves the previous checkpoint as it was.

A run folder belongs to one run at a time: ``RunFolder`` holds an exclusive ``flock`` on
``run.lock`` (which records the owner's pid) for the run's lifetime. The kernel releases it when
the process ends, however it ends (kill -9 included), so a lock left by a dead run is taken over
by the next one, and a second live run into the same folder is refused at start. Taking the lock
also proves the folder writable, and the free space is compared with the checkpoint's size.

Every failure is a ``CheckpointError`` or ``RunFolderError`` (both ``ValueError``s) whose message is
one line naming the file or the folder; ``wgan-kernels train`` prints it and exits with status 2.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import torch

FORMAT = "wgan_kernels.train"
VERSION = 1
CHECKPOINT = "checkpoint.pt"
LOCK = "run.lock"

__all__ = ["CheckpointError", "RunFolderError", "RunFolder", "save", "load", "digest", "FORMAT", "VERSION"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, verified, resumed from or written."""


class RunFolderError(ValueError):
    """A run folder that cannot be used: not a folder, not writable, too full, or in use."""


def first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unpickler_reason(e: BaseException) -> str:
    """The cause inside torch's long weights-only error ("Unsupported global: GLOBAL x ...")."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return first_line(text.split(". ")[0])


# ----------------------------------------------------------------------------- digest


def _feed(h, obj) -> None:
    """Hashes ``obj`` in a canonical order: the same digest before ``torch.save`` and after
    ``torch.load`` (dict keys sorted, tensors by dtype, shape and bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(f"S{len(data)}|".encode() + data)
    elif isinstance(obj, bytes):
        h.update(f"Y{len(obj)}|".encode() + obj)
    elif obj is None or isinstance(obj, bool):
        h.update(f"{obj}|".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj}|".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()}|".encode())
    else:
        raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} (tensors and plain data only)")


def digest(state) -> str:
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def nbytes(state) -> int:
    """The bytes of the tensors in ``state``: about a checkpoint's size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(nbytes(v) for v in state)
    return 0


# ----------------------------------------------------------------------------- save / load


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save(path: Path, state: dict) -> None:
    """Writes ``state`` atomically (see the module docstring); raises ``CheckpointError``."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "sha256": digest(state), "state": state}
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: no new meaning
            raise
        free = _free_bytes(path.parent)
        room = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"out: writing {path} failed ({first_line(e)}{room}); {kept}") from e
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    try:  # makes the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def load(path: Path) -> dict:
    """The verified ``state`` of a checkpoint; a ``CheckpointError`` naming the file otherwise.
    Never unpickles anything but tensors and plain data (``weights_only=True``)."""
    path = Path(path)
    where = f"resume: {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = _unpickler_reason(e)
        if "global" in why.lower():  # a reference to a function or class: what code execution needs
            raise CheckpointError(f"{where}: refused, it references code ({why}); a checkpoint holds tensors and "
                                  "plain data only, so this file was crafted or damaged") from e
        raise CheckpointError(f"{where}: not a readable checkpoint (corrupt: {why})") from e
    except Exception as e:
        raise CheckpointError(f"{where}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a wgan_kernels training checkpoint (no {FORMAT!r} format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{where}: checkpoint format version {payload.get('version')!r}; this version of "
                              f"wgan_kernels reads version {VERSION}")
    state = payload.get("state")
    try:
        actual = digest(state)
    except TypeError as e:
        raise CheckpointError(f"{where}: corrupt ({first_line(e)})") from e
    if not isinstance(state, dict) or actual != payload.get("sha256"):
        raise CheckpointError(f"{where}: corrupt, its contents do not match the checksum written with them "
                              "(the file was modified or damaged after it was saved)")
    return state


# ----------------------------------------------------------------------------- run folder


class RunFolder:
    """The output folder of one run, locked while the run holds it (see the module docstring).
    ``acquire()`` / ``release()`` nest: only the outermost pair takes and drops the lock."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        self.checkpoint = self.path / CHECKPOINT
        self._fd: int | None = None
        self._depth = 0

    def acquire(self, expected_bytes: int = 0) -> "RunFolder":
        if self._depth:
            self._depth += 1
            return self
        import fcntl

        out = self.path
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"out: {out} is a file, not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"out: cannot write to {out} ({e.strerror or first_line(e)})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"out: {out} is in use by another run (pid {owner}); give this run its own "
                                 "--out, or wait for that one to finish") from None
        try:  # the probe write: the folder takes files, and holds a checkpoint
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
            free = _free_bytes(out)
            need = int(expected_bytes * 1.1) + 2**20
            if expected_bytes and free is not None and free < need:
                raise RunFolderError(f"out: {out} has {free / 2**20:.1f} MiB free, a checkpoint needs about "
                                     f"{need / 2**20:.1f} MiB")
        except OSError as e:
            os.close(fd)
            raise RunFolderError(f"out: cannot write to {out} ({e.strerror or first_line(e)})") from e
        except BaseException:
            os.close(fd)
            raise
        for stale in out.glob(f".{CHECKPOINT}.*.tmp"):  # left by a run killed mid-write: ours now
            try:
                stale.unlink()
            except OSError:
                pass
        self._fd = fd
        self._depth = 1
        return self

    @property
    def held(self) -> bool:
        """Whether this run holds the folder's lock now."""
        return self._depth > 0

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (unlinking it would race a new owner)
            self._fd = None

    def __enter__(self) -> "RunFolder":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
