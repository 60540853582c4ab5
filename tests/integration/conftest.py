"""Fixtures shared by the training methods' end-to-end tests."""

import pytest

from ovseg.data.synthetic import write_synthetic


@pytest.fixture
def voc_root(tmp_path):
    """A data root with 4 VOC train+aug images (the training source) and 2 voc21 val images (the evaluation)."""
    root = tmp_path / "data"
    write_synthetic("voc_aug", root, split="trainaug", num_images=4, seed=1)
    write_synthetic("voc21", root, split="val", num_images=2, seed=2)
    return root


def out_args(out) -> list[str]:
    """Command-line arguments sending a run's checkpoints and logs to ``out``."""
    return ["--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)]
