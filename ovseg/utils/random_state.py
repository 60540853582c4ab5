"""Random streams a training run continues from a checkpoint: python, numpy, torch (CPU and CUDA) and every
``torch.Generator`` a module owns, per process (each DDP rank has its own)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _generators(module: torch.nn.Module) -> dict[str, torch.Generator]:
    return {f"{name}.{attr}" if name else attr: value
            for name, sub in module.named_modules() for attr, value in vars(sub).items()
            if isinstance(value, torch.Generator)}


def capture(module: torch.nn.Module) -> dict[str, Any]:
    """The streams as tensors and plain numbers, which checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {"python": [version, list(python_state), gauss_next],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state(),
             "generators": {name: g.get_state() for name, g in _generators(module).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(module: torch.nn.Module, state: dict[str, Any]) -> None:
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    owned = _generators(module)
    for name, generator_state in state.get("generators", {}).items():
        if name in owned:
            owned[name].set_state(generator_state)


def capture_all_ranks(module: torch.nn.Module) -> list[dict[str, Any]]:
    """Every process's :func:`capture`, in rank order (collective under DDP: every rank must call it)."""
    state = capture(module)
    _, world = _rank_world()
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def restore_own_rank(module: torch.nn.Module, states: list[dict[str, Any]]) -> bool:
    """Restore this process's entry of :func:`capture_all_ranks`; False when the checkpoint was written by another
    number of processes (the run then continues from its fresh streams)."""
    rank, world = _rank_world()
    if len(states) != world:
        return False
    restore(module, states[rank])
    return True
