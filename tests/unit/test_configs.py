"""Every shipped config parses (fragments resolved, every key known), and every fragment is used."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovseg.runner import OVSegCLI

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
#: group fragments (``data: ../data/x.yaml``, ``--trainer configs/trainer/x.yaml``) and whole-config overlays
#: (``--config configs/logger/wandb.yaml``) are not configs of their own
FRAGMENT_DIRS = ("data", "trainer", "logger")
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in FRAGMENT_DIRS)


class ParseOnly(OVSegCLI):
    """Parse and validate, build nothing (the real configs name hub weights that cannot be fetched here)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str) -> dict:
    return ParseOnly(args=list(args), run=False).config.as_dict()


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(config):
    cfg = parse("--config", str(config))
    assert cfg["model"]["class_path"].startswith("ovseg.") and cfg["data"]["init_args"]["datasets"]


def test_fragments_compose_and_the_command_line_still_wins():
    cfg = parse("--config", str(CONFIGS / "eval/sclip_vitb16.yaml"), "--data.root", "/elsewhere",
                "--trainer", str(CONFIGS / "trainer/ddp_cpu.yaml"))
    assert cfg["data"]["init_args"]["datasets"] == ["voc21", "context60", "coco_object", "voc20", "context59",
                                                     "coco_stuff171", "cityscapes", "ade150"]
    assert cfg["data"]["init_args"]["root"] == "/elsewhere" and cfg["data"]["init_args"]["num_workers"] == 4
    assert (cfg["trainer"]["accelerator"], cfg["trainer"]["devices"], cfg["trainer"]["strategy"]) == ("cpu", 2, "ddp")
    pixelclip = parse("--config", str(CONFIGS / "pixelclip_vitb16_dino.yaml"))["trainer"]
    assert (pixelclip["max_steps"], pixelclip["gradient_clip_val"], pixelclip["devices"]) == (10000, 0.01, 4)


def test_the_fold_is_a_setting_of_one_config():
    for fold in range(4):
        cfg = parse("--config", str(CONFIGS / "clips4_context.yaml"),
                    "--model.init_args.known_classes", f"context59-fold{fold}")
        assert cfg["model"]["init_args"]["known_classes"] == f"context59-fold{fold}"
        assert cfg["model"]["init_args"]["strict_vocabulary"] is True


def test_every_fragment_is_used():
    texts = "\n".join(p.read_text() for p in RUN_CONFIGS)
    for directory in ("data", "trainer"):
        for fragment in sorted((CONFIGS / directory).glob("*.yaml")):
            # given on the command line beside a run config: ddp_cpu (`--trainer`), the large-vocabulary sets (`--data`)
            used = f"{directory}/{fragment.name}" in texts or fragment.name in ("ddp_cpu.yaml",
                                                                                "benchmarks_large_vocab.yaml")
            assert used, f"configs/{directory}/{fragment.name} is not used by any config"

