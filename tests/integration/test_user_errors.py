"""Findings of the fault-injection review (issue "runs that survive interruption…"): each input that used to give a
silent wrong result now gives the right one or a one-line error naming the file."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import COMMANDS, TRAINER_SUBCOMMANDS, main
from ovseg.data.classnames import parse_class_list
from ovseg.data.seg_dataset import DataError, SegFileDataset
from ovseg.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny/maskclip.yaml")


def test_default_root_dir_decides_where_a_run_lands(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", TINY, "--data.root", str(synthetic_root), "--data.datasets", "[voc21]",
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "runs/lightning_logs/version_0/results.json").is_file()
    assert not (tmp_path / "outputs").exists()


def test_an_explicit_logger_save_dir_still_wins(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", TINY, "--data.root", str(synthetic_root), "--data.datasets", "[voc21]",
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
          str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "logs/lightning_logs/version_0/results.json").is_file()


def test_predict_keeps_images_that_share_a_stem(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / "x.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 20, 3), dtype=np.uint8)).save(images / "x.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / "y.png")
    out = tmp_path / "pred"
    main(["predict", "--config", TINY, "--images", str(images), "--classes", "cat,dog",
          "--model.init_args.predict_dir", str(out), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    shapes = {p.name: np.asarray(Image.open(p)).shape for p in out.glob("*_label.png")}
    assert shapes == {"x.jpg_label.png": (30, 40), "x.png_label.png": (50, 20), "y_label.png": (20, 20)}


def test_class_list_or_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        parse_class_list("classes.txt")  # a missing file is an error, not one class named "classes.txt"
    (tmp_path / "cat").write_text("dog\nsky\n")
    assert parse_class_list("cat") == [["cat"]]  # an inline word stays a word
    (tmp_path / "classes.txt").write_text("dog, puppy\nsky\n")
    assert parse_class_list("classes.txt") == [["dog", "puppy"], ["sky"]]


def test_a_name_given_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'cat' is given twice"):
        parse_class_list("cat,dog;cat,sky")
    (tmp_path / "c.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="c.txt.*'cat' is given twice"):
        parse_class_list(str(tmp_path / "c.txt"))


def test_repeated_dataset_class_names_are_refused(tmp_path):
    from ovseg.eval.evaluator import dataset_vocabulary
    from ovseg.eval.protocols import load_protocol

    settings = load_protocol("maskclip").settings_for("voc20", {"class_names": "{dataset}"})
    names = [[f"class{i}"] for i in range(20)]
    names[7] = ["class3"]
    with pytest.raises(ValueError, match=r"repeat \['class3'\]"):
        dataset_vocabulary(settings, "voc20", names, None)


def test_an_id_listed_twice_in_a_split_file_is_refused(tmp_path):
    write_synthetic("voc21", tmp_path, num_images=3, seed=0)
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    ids = split.read_text().split()
    split.write_text("\n".join(ids + ids[:1]) + "\n")
    with pytest.raises(DataError, match=rf"{split.name}.*more than once.*{ids[0]}"):
        SegFileDataset("voc21", tmp_path)


def _fake_checkpoint(path: Path, class_path: str, **hparams) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path, **hparams}}, path)
    return path


def test_a_checkpoint_of_another_method_is_refused(synthetic_root, tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "clips4.ckpt", "ovseg.methods.clips4.method.CLIPS4")
    with pytest.raises(ValueError, match="checkpoint of CLIPS4.*config's model is MaskCLIP"):
        main(["test", "--config", TINY, "--data.root", str(synthetic_root), "--ckpt_path", str(ckpt)])
    from ovseg.runner import check_checkpoint_method

    same = _fake_checkpoint(tmp_path / "maskclip.ckpt", "ovseg.methods.zeroshot.MaskCLIP")
    check_checkpoint_method(same, "ovseg.methods.MaskCLIP")  # the same class, spelled two ways


def test_folds_refuse_checkpoints_in_the_wrong_order(tmp_path):
    from ovseg.bench.folds import run_folds

    ckpts = [_fake_checkpoint(tmp_path / f"f{i}.ckpt", "ovseg.methods.CLIPS4", known_classes=f"context59-fold{j}")
             for i, j in enumerate([0, 2, 1, 3])]
    with pytest.raises(ValueError, match=r"f1.ckpt: given as fold 1, but trained with known_classes 'context59-fold2'"):
        run_folds(str(tmp_path), [str(c) for c in ckpts], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_checkpoint_is_one_line(synthetic_root, tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "full.ckpt", "ovseg.methods.MaskCLIP")
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "-m", "ovseg", "test", "--config", TINY, "--data.root",
                           str(synthetic_root), "--ckpt_path", str(tmp_path / "cut.ckpt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "cut.ckpt: cannot read the checkpoint: truncated" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"\n  {name} " in text for name in (*TRAINER_SUBCOMMANDS, *COMMANDS))


def test_every_wandb_run_keeps_its_own_config(synthetic_root, tmp_path, monkeypatch):
    """Finding 8: with wandb, Lightning writes config.yaml into the logger's save_dir, which every run shares."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for limit in (1, 2):
        try:
            main(["test", "--config", TINY, "--config", str(REPO / "configs/logger/wandb.yaml"), "--data.root",
                  str(synthetic_root), "--data.datasets", "[voc21]", "--data.limit", str(limit),
                  "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
        finally:
            if wandb.run is not None:
                wandb.finish()
    configs = sorted(tmp_path.glob("ovseg/*/config.yaml"))
    assert len(configs) == 2 and not (tmp_path / "config.yaml").exists()
    assert sorted("limit: 1" in p.read_text() for p in configs) == [False, True]


def test_a_run_without_logger_leaves_the_config_in_outputs_alone(synthetic_root, tmp_path, monkeypatch):
    """`ovseg test --trainer.logger false` from the checkout rewrote its (git-ignored) outputs/config.yaml."""
    monkeypatch.chdir(tmp_path)
    kept = tmp_path / "outputs/config.yaml"
    kept.parent.mkdir()
    kept.write_text("# an earlier run's config\n")
    main(["test", "--config", TINY, "--data.root", str(synthetic_root), "--data.datasets", "[voc21]",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "outputs/results.json").is_file()  # the run did run
    assert kept.read_text() == "# an earlier run's config\n"


def test_synthetic_splits_never_overwrite_each_other(tmp_path):
    """Finding 9: VOC's val and train+aug share JPEGImages; a second split overwrote the first's images."""
    val_ids = write_synthetic("voc21", tmp_path, split="val", num_images=3, seed=1)
    images = tmp_path / "VOCdevkit/VOC2012/JPEGImages"
    before = {i: (images / f"{i}.jpg").read_bytes() for i in val_ids}
    aug_ids = write_synthetic("voc_aug", tmp_path, split="trainaug", num_images=3, seed=2)
    assert not set(val_ids) & set(aug_ids)
    assert all((images / f"{i}.jpg").read_bytes() == data for i, data in before.items())
    write_synthetic("ade150", tmp_path, num_images=3, seed=3)
    with pytest.raises(DataError, match="already holds 1 other file"):  # no split file: it would be scored too
        write_synthetic("ade150", tmp_path, num_images=2, seed=3)


def test_data_synth_writes_the_sa1b_folder_the_tiny_pixelclip_trains_on(tmp_path):
    from ovseg.methods.pixelclip.data import SA1B

    assert main(["data", "synth", "--root", str(tmp_path), "--datasets", "voc20,sa1b", "--num-images", "3"]) == 0
    dataset = SA1B(folder="sa1b", resize_short=48, crop_size=40).build(tmp_path)
    assert len(dataset) == 3 and dataset[0]["masks"].shape[0] > 0
    assert len(SegFileDataset("voc20", tmp_path)) == 3


def _shell(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovseg", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_config_typo_and_bad_yaml_are_short_errors(synthetic_root, tmp_path):
    typo = _shell("test", "--config", TINY, "--data.root", str(synthetic_root), "--model.init_args.protocl", "x")
    assert typo.returncode == 2 and "'protocl' is not accepted" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) <= 15 and "--trainer.max_epochs" not in typo.stderr  # no usage dump
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: [oops\n")
    broken = _shell("test", "--config", str(bad))
    assert broken.returncode == 2 and f"{bad}:3:1: not valid YAML" in broken.stderr


@pytest.mark.ddp
def test_under_ddp_a_bad_file_is_the_last_word_not_a_gloo_traceback(tmp_path):
    write_synthetic("voc21", tmp_path, num_images=4, seed=0)
    bad = sorted((tmp_path / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))[-1]  # rank 1's shard
    bad.write_bytes(b"corrupt")
    proc = _shell("test", "--config", TINY, "--data.root", str(tmp_path), "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
                  "false")
    assert proc.returncode != 0
    assert f"{bad.name}: cannot decode image" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ovseg: error:")


def test_class_names_outside_ascii_are_drawn(tmp_path):
    """Finding 10: Pillow's built-in font draws every non-ASCII letter as the same box."""
    import warnings

    from PIL import ImageDraw

    from ovseg.eval.visualize import label_font

    label_font.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        font = label_font()
    if any("no Unicode TrueType font" in str(w.message) for w in caught):
        pytest.skip("no Unicode TrueType font on this machine (the warning says how to install one)")

    def drawn(text: str) -> np.ndarray:
        canvas = Image.new("L", (40, 20))
        ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
        return np.asarray(canvas)

    assert not np.array_equal(drawn("é"), drawn("□")) and not np.array_equal(drawn("é"), drawn("e"))
    assert not np.array_equal(drawn("ж"), drawn("□"))


def _registered_attentions() -> str:
    """The registry as it stands when the error is raised (other tests register attentions of their own)."""
    from ovseg.models.attention import LAST_BLOCK_ATTENTIONS

    assert {"value", "vanilla", "qq_kk", "naclip"} <= set(LAST_BLOCK_ATTENTIONS)
    return str(sorted(LAST_BLOCK_ATTENTIONS))


@pytest.mark.parametrize("setting, typo, choices", [
    ("clip.last_block", "valu", _registered_attentions),
    ("protocol", "maskclp", lambda: "clearclip, cliptrase, itaclip, lposs, maskclip, naclip, pixelclip, "
                                    "pixelclip_masks, proxyclip, scclip, sclip, toyworld, trident"),
])
def test_a_misspelt_choice_is_one_line_naming_the_valid_ones(setting, typo, choices, synthetic_root, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(sys, "argv", ["ovseg", "test", "--config", TINY, "--data.root", str(synthetic_root),
                                      f"--model.init_args.{setting}", typo])
    assert main() == 1
    stderr = capsys.readouterr().err
    error = stderr[stderr.index("ovseg: error: "):].strip().splitlines()  # Lightning's log lines come before
    assert choices() in error[0] and repr(typo) in error[0]
    assert error[1:] == ["(set OVSEG_DEBUG=1 for the traceback)"]
