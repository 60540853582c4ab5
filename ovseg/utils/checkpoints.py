"""Checkpoints that survive a kill or a full disk, and ``--ckpt_path last``.

Lightning's own save serializes to memory, writes a temporary file in the *system* temp folder and moves it over
the checkpoint: where that folder is on another filesystem (local ``/tmp``, runs on network storage) the move is a
copy over the old file, and a kill during it leaves a truncated (even 0-byte) ``last.ckpt``. Here every checkpoint
is written to a temporary name in its own folder, fsynced and renamed over the old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ovseg.utils.io import atomic_open, remove_stale_temps

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoints", "find_last_checkpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose saves are atomic on local and network filesystems (see the module)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        if path.parent.is_dir():
            remove_stale_temps(path.parent)  # left by a writer that was killed
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)
        return None


def use_atomic_checkpoints(trainer) -> None:
    """Give the trainer's strategy :class:`AtomicCheckpointIO` unless a checkpoint plugin was chosen."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def find_last_checkpoint(root: str | Path) -> Path:
    """``--ckpt_path last``: the newest ``last*.ckpt`` of the runs under ``root`` (``<root>/…/checkpoints/``);
    ValueError saying what to pass when there is none. Stale temporary files next to it are removed."""
    root = Path(root).expanduser()
    found = [p for p in root.rglob("last*.ckpt") if p.is_file()] if root.is_dir() else []
    if not found:
        raise ValueError(f"--ckpt_path last: no last.ckpt in the runs under {root} (--trainer.default_root_dir); pass "
                         f"the file, e.g. --ckpt_path {root}/lightning_logs/version_0/checkpoints/last.ckpt")
    newest = max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))
    remove_stale_temps(newest.parent)
    return newest
