"""File output that never leaves a half-written file: write to a temporary sibling, fsync, then rename (the old file
survives any interruption; a full disk is one error naming the path)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
from PIL import Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: errors of a full disk or an exhausted quota
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _owner_tag() -> str:
    """``host-pid`` in a temporary file's name: a later run on this host removes the files of dead writers."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path`` (same folder, so same filesystem: the rename is atomic, never a copy);
    on success it is fsynced and replaces ``path``. A full disk raises OSError(ENOSPC) naming ``path``, the old file
    kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            kept = "; the previous file is kept" if path.exists() else ""
            raise OSError(err.errno, f"no space left on device, not written{kept}", str(path)) from None
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem (or OS) lets a folder be opened and synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`atomic_open` writers on this host left in ``folder`` when they were
    killed (their process is gone); returns them. Files of live writers and of other hosts are kept."""
    host = socket.gethostname().split(".")[0]
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        match = re.fullmatch(rf"\..+\.{re.escape(host)}-(\d+)\.[^.]+\.tmp", tmp.name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_save_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a uint8 label map (palette PNG when ``palette`` is given) or an RGB image."""
    image = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        image = image.convert("P") if image.mode != "L" else image
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def atomic_save_tiff(path: str | Path, array: np.ndarray) -> None:
    """Save a 16-bit label map as a TIFF, as CAT-Seg writes ADE-847 and PC-459 labels
    (``Image.fromarray(uint16).save(path, "TIFF")``: mode ``I;16``, uncompressed)."""
    if array.dtype != np.uint16:
        raise TypeError(f"{path}: 16-bit TIFF labels take uint16 arrays, got {array.dtype}")
    with atomic_open(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(array)).save(f, format="TIFF")


def load_weights_file(path: str | Path, what: str = "weights file", allow_numpy: bool = False, **kwargs: Any) -> Any:
    """``torch.load`` of a checkpoint or weights file that never runs code from it: ``weights_only=True`` (tensors,
    plain containers and numbers), plus exactly numpy's array and scalar types when ``allow_numpy`` (detectron2,
    DINO and SAM files store a few). Anything else in the pickle, a missing, truncated or foreign file raises
    ValueError / FileNotFoundError in one line naming ``path``.

    Args:
        path: the file.
        what: what it is, for the error (``"PixelCLIP checkpoint"``).
        allow_numpy: also allow numpy arrays and scalars.
        **kwargs: more ``torch.load`` arguments (``mmap=True``).
    """
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    allowed = numpy_safe_globals() if allow_numpy else []
    if kwargs.get("mmap") and not zipfile.is_zipfile(path):
        kwargs.pop("mmap")  # torch.save's legacy (pre-1.6) format cannot be memory-mapped; read it whole
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice to load it unsafely; its "Unsupported global: GLOBAL x" line is the fact
        # ("Unsupported global: GLOBAL x" for unknown names, "unsupported GLOBAL x whose module is blocked" for os & co)
        unsafe = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
        detail = f"it references {unsafe.group(1)}" if unsafe else str(err).strip().splitlines()[0][:200]
        raise ValueError(f"{path}: refusing to load the {what}: it holds objects other than tensors, numbers and "
                         f"containers, which could run code ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot read the {what}: truncated or not a PyTorch file "
                         f"({type(err).__name__}: {first})") from None


def numpy_safe_globals() -> list[Any]:
    """The numpy reconstruction functions and types that pickled arrays and scalars reference (and nothing that
    calls out of numpy)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = {type(np.dtype(name)) for name in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                                                  "int64", "uint64", "float16", "float32", "float64")}
    # files written under numpy 1 name the functions ``numpy.core.multiarray.*``
    aliases = [(fn, f"numpy.core.multiarray.{fn.__name__}") for fn in (multiarray._reconstruct, multiarray.scalar)]
    return [multiarray._reconstruct, multiarray.scalar, *aliases, np.ndarray, np.dtype, *sorted(dtypes, key=str)]


def claim_version_folder(root: str | Path, first: int = 0) -> int:
    """Create ``root/version_N`` for the first free ``N >= first`` and return ``N``: ``mkdir`` either creates the
    folder or fails, so two runs started together never share one (Lightning's loggers list the folders, then
    create theirs later)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = first
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def claim_file(path: str | Path, what: str) -> Path:
    """Create ``path`` exclusively, holding ``host-pid`` of this process, and return it; one left by a dead process
    of this host is taken over. Another live claim raises ValueError naming ``what`` and the owner."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
            host, _, pid = owner.rpartition("-")
            if owner == _owner_tag() or (host == socket.gethostname().split(".")[0] and pid.isdigit()
                                         and not _alive(int(pid))):
                path.unlink(missing_ok=True)  # its owner was killed, or was an earlier (failed) run of this process
                continue
            raise ValueError(f"{what}: another run ({owner or 'unknown'}) is using it; wait for it, choose another, "
                             f"or delete {path} if no such run is active") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_owner_tag())
        return path
    raise ValueError(f"{what}: could not claim {path}")
