"""CLIP-S4 trains the same on N processes as on one: a 2-process (gloo) step's averaged gradient equals the
1-process gradient of the same global batch, with the unknown prototypes among the semantic targets and, for
``segsort_plus``, region groups and segment counts that differ between the processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("clips4_gradient_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, world: int, pixel_loss: str) -> dict[str, torch.Tensor]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), pixel_loss], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    return torch.load(out)


@pytest.mark.ddp
@pytest.mark.parametrize("pixel_loss", ["segsort_plus", "segsort_multi_positive", "infonce"])
def test_two_processes_give_the_one_process_gradient(tmp_path, pixel_loss):
    one = _run(tmp_path / "one.pt", 1, pixel_loss)
    two = _run(tmp_path / "two.pt", 2, pixel_loss)
    assert one.keys() == two.keys() and len(one) > 2
    flat_one = torch.cat([g.flatten() for g in one.values()]).double()
    flat_two = torch.cat([two[name].flatten() for name in one]).double()
    assert flat_one.norm() > 0
    relative = float((flat_two - flat_one).norm() / flat_one.norm())
    assert relative <= 1e-5, relative
