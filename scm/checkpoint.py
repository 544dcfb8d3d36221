"""Checkpoints that survive a kill -9 and never run code on load.

Writing (`save_atomic`, `export_safetensors`): the payload goes to a temporary file in the destination's
own directory (so the rename below stays inside one file system), which is flushed and fsync'ed; then
``os.replace`` swaps it in (an atomic rename on POSIX and Windows) and the directory is fsync'ed so the
rename itself is durable. A process killed at any instant leaves ``path`` either as it was before or as
the complete new file, never a partial one; at worst a stray ``.<name>.*.tmp`` file stays behind
(`CheckpointManager` removes those of its own prefix when it starts).

Reading (`load_checkpoint`): ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and
plain containers; a file that carries any other pickled object (whose ``__reduce__`` could run code) is
refused before anything in it is called. Before unpickling, the zip container's CRC-32 checksums are
verified, so a truncated file or one with flipped bytes gives `CheckpointError` naming the file rather than
silently wrong tensors.

Payloads (`save_atomic`) may hold only: tensors, dict, list, tuple, str, int, float, bool, None (plus
torch.Size / dtype / device, which weights_only loading also accepts); anything else is rejected when
saving with a TypeError naming its key path, so that a run never writes a checkpoint it cannot resume
from.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["CheckpointError", "CheckpointManager", "export_safetensors", "load_checkpoint", "save_atomic"]

_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)  # exact types only
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: truncated, corrupt, or refused by weights_only loading."""


def _check_payload(obj: Any, where: str) -> None:
    """Raise TypeError at the first value that weights_only loading would refuse (key path in the message)."""
    if type(obj) in _TENSORS or type(obj) in _PLAIN:
        return
    if isinstance(obj, torch.Tensor):
        raise TypeError(f"checkpoint payload: {where} is a tensor subclass {type(obj).__qualname__}; save a "
                        "plain tensor (e.g. DTensor.full_tensor(), or a full state dict)")
    if isinstance(obj, Mapping):
        if not isinstance(obj, dict):
            raise TypeError(f"checkpoint payload: {where} is a {type(obj).__name__}; expected a plain dict")
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise TypeError(f"checkpoint payload: key {k!r} of {where} has type {type(k).__name__}; "
                                "expected str, int, float, bool or None")
            _check_payload(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_payload(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint payload: {where} has type {type(obj).__module__}.{type(obj).__qualname__}; "
                    "expected only tensors, dict, list, tuple, str, int, float, bool or None "
                    "(what torch.load(weights_only=True) accepts)")


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (POSIX). Windows cannot open a directory: skipped there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write: Callable[[IO[bytes]], None]) -> Path:
    """write(f) into a temporary file next to `path`, flush + fsync, os.replace onto `path`, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def save_atomic(obj: dict, path) -> Path:
    """torch.save(obj) to `path` atomically (see the module docstring). obj: a dict of the payload types
    listed in the module docstring (TypeError otherwise, before anything is written). Returns the Path."""
    if not isinstance(obj, dict):
        raise TypeError(f"save_atomic: obj must be a dict, got {type(obj).__name__}")
    _check_payload(obj, "obj")
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _is_environment_error(e: BaseException) -> bool:
    """Errors that say nothing about the file (a CUDA map_location without CUDA, out of memory)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("deserialize object on" in msg or "map_location" in msg)


def load_checkpoint(path, map_location="cpu", *, verify: bool = True) -> dict:
    """Load a checkpoint written by `save_atomic` with torch.load(weights_only=True).

    Raises FileNotFoundError if `path` does not exist, and `CheckpointError` naming the file when it is
    truncated or corrupt (including a CRC-32 mismatch of the zip container when ``verify``, which costs one
    extra read of the file, about 0.07 s per 200 MB), when it carries a pickled object that weights_only
    loading refuses (it is never executed), or when its top level is not a dict. Errors that are not about
    the file (e.g. map_location="cuda" without CUDA) propagate unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except Exception as e:  # noqa: BLE001 - any failure to read the container means a broken file
            raise CheckpointError(f"cannot load checkpoint {path}: the file is truncated or corrupt "
                                  f"({type(e).__name__}: {e})") from e
        if bad is not None:
            raise CheckpointError(f"cannot load checkpoint {path}: the file is corrupt "
                                  f"(CRC-32 mismatch in its member {bad!r})")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols > 2 (refused or not) is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if _is_environment_error(e):
            raise
        msg = str(e)
        if "Weights only load failed" in msg:
            # torch's message: a generic first paragraph, then what was refused (e.g. "Trying to load
            # unsupported GLOBAL os.system ..." or "WeightsUnpickler error: Unsupported global: ...").
            paras = [q.strip() for q in msg.split("\n\n") if q.strip()][1:]
            paras = [q for q in paras if not q.startswith("Check the documentation")]
            detail = " ".join(paras)[:300] or type(e).__name__
            raise CheckpointError(
                f"refused to load checkpoint {path}: it carries pickled data that weights_only loading does "
                f"not allow ({detail}); nothing in it was executed. Only load such a file with "
                "weights_only=False if you trust its origin.") from None
        raise CheckpointError(f"cannot load checkpoint {path}: the file is truncated or corrupt "
                              f"({type(e).__name__}: {msg[:200]})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot use checkpoint {path}: expected a dict at its top level, "
                              f"got {type(obj).__name__}")
    return obj


class CheckpointManager:
    """Numbered checkpoints ``<directory>/<prefix>-<step:09d>.pt``, written atomically, keeping the newest
    `keep_last` (None keeps all).

    `load_latest` returns the newest file that loads; broken newer files give one warning naming them.
    Constructing a manager touches nothing (readers may use one on a run that is still writing); the
    directory is created by the first `save`, which also removes temporary files left by interrupted
    saves (``.<prefix>-*.pt.*.tmp``; one writer per directory is assumed).
    """

    def __init__(self, directory, keep_last: int | None = 3, prefix: str = "ckpt"):
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.pt$")

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step:09d}.pt"

    def paths(self) -> list[Path]:
        """The checkpoint files present, oldest (smallest step) first ([] when the directory is missing)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self._pattern.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def save(self, state: dict, step: int) -> Path:
        """Write `state` atomically as the checkpoint of `step`, then delete the oldest beyond keep_last
        (never the file just written) and stray temporary files of interrupted saves. Returns its path."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        path = save_atomic(state, self.path_for(step))
        for stale in self.directory.glob(f".{self.prefix}-*.pt.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        if self.keep_last is not None:
            for old in self.paths()[:-self.keep_last]:
                if old != path:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
        return path

    def load_latest(self, map_location="cpu") -> tuple[dict, Path] | None:
        """(state, path) of the newest checkpoint that loads, or None when there is none at all.

        Broken newer files are skipped with ONE warning naming them; if every file is broken, raises
        CheckpointError listing them (resuming from scratch silently would be worse).
        """
        broken: list[tuple[Path, str]] = []
        for path in reversed(self.paths()):
            try:
                state = load_checkpoint(path, map_location=map_location)
            except (CheckpointError, FileNotFoundError) as e:
                broken.append((path, str(e)))
                continue
            if broken:
                names = "; ".join(f"{p.name} ({msg})" for p, msg in broken)
                warnings.warn(f"skipped {len(broken)} unloadable checkpoint(s) in {self.directory}: {names}; "
                              f"using {path.name}", RuntimeWarning, stacklevel=2)
            return state, path
        if broken:
            raise CheckpointError(f"no loadable checkpoint in {self.directory}: "
                                  + "; ".join(msg for _, msg in broken))
        return None


def export_safetensors(state_dict: dict, path, metadata: dict[str, str] | None = None) -> Path:
    """Write a flat {name: tensor} state dict as a .safetensors file, atomically. Tensors are moved to the
    CPU and made contiguous; tensors sharing storage (tied weights) are stored as separate copies.
    metadata: optional {str: str} stored in the file's header (safetensors.safe_open(...).metadata())."""
    from safetensors.torch import save as st_save

    if not isinstance(state_dict, Mapping):
        raise TypeError("export_safetensors: state_dict must be a dict of tensors, "
                        f"got {type(state_dict).__name__}")
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in metadata.items()):
            raise TypeError(f"export_safetensors: metadata must be a dict[str, str], got {metadata!r}")
        metadata = dict(metadata)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"export_safetensors: entry {k!r} is a {type(v).__name__}; expected str -> tensor"
                            " (a flat state dict such as model.state_dict())")
        t = v.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        tensors[k] = t
    data = st_save(tensors, metadata=metadata)
    return _atomic_write(path, lambda f: f.write(data))
