"""ADE20K-847 and Pascal Context-459: converters (against hand-built fixtures and, with ``OVSEG_PARITY_CATSEG`` set
to a CAT-Seg checkout, against its own preparation scripts on the same fake downloads), specs, verify, synth, and
the evaluator on 16-bit labels with 459/847 classes."""

from __future__ import annotations

import ast
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from ovseg.data.classnames import display_names, read_class_names
from ovseg.data.seg_dataset import SegFileDataset
from ovseg.data.specs import WIDE_IGNORE_INDEX, get_spec
from ovseg.data.synthetic import write_synthetic
from ovseg.data.verify import verify_dataset
from ovseg.eval.inference import labels_from_logits, labels_from_masks
from ovseg.eval.metrics import ConfusionMatrix
from ovseg.tools.convert import CONVERTERS, ConversionError, ConversionWarning
from ovseg.tools.convert.ade847 import ADE847_ADE_IDS, convert_ade847
from ovseg.tools.convert.pc459 import convert_pc459

ADE = "ADE20K_2021_17_01"


def catseg_checkout() -> Path:
    folder = os.environ.get("OVSEG_PARITY_CATSEG")
    if not folder or not Path(folder).is_dir():
        pytest.skip("no CAT-Seg checkout: git clone https://github.com/cvlab-kaist/CAT-Seg and set OVSEG_PARITY_CATSEG")
    return Path(folder)


def run_reference(script: Path, data_root: Path) -> None:
    """Run one of CAT-Seg's datasets/prepare_*.py on ``data_root`` (its DETECTRON2_DATASETS)."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(data_root)}
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=data_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def class_file_lines(name: str) -> list[str]:
    """The shipped class-name file, line by line, as written (the reader strips ``c p u `` to ``c p u``)."""
    return (Path(__file__).parents[2] / "ovseg/data/classnames" / f"{name}.txt").read_text().splitlines()


def read_tif(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "I;16", f"{path}: mode {im.mode}"
        return np.asarray(im)


# -- ADE-847 ------------------------------------------------------------------------------------------------------
#: ADE class index -> train id, by hand from CAT-Seg's table (wall, building, sky, ..., the last entry)
HAND_IDS = {2978: 0, 312: 1, 2420: 2, 3148: 846}
NOT_847 = next(i for i in range(1, 4000) if i not in ADE847_ADE_IDS)


def seg_png(rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
    """An ADE ``_seg.png`` for class indices: R = class // 256 * 10 + instance noise < 10, G = class % 256."""
    r = (classes // 256) * 10 + rng.integers(0, 10, classes.shape)
    return np.stack([r, classes % 256, rng.integers(0, 256, classes.shape)], axis=-1).astype(np.uint8)


def fake_ade_full(root: Path, sizes=((40, 56), (600, 520)), train: int = 1) -> dict[str, np.ndarray]:
    """index_ade20k.pkl + images and _seg.png in the release's layout; returns each val image's class map."""
    rng = np.random.default_rng(0)
    choices = np.array([0, NOT_847, *HAND_IDS, *ADE847_ADE_IDS[250:262]])  # 255/256 straddle the uint8 range
    folders, names, classes_of = [], [], {}
    for split, count in (("val", len(sizes)), ("train", train)):
        for k in range(count):
            h, w = sizes[k % len(sizes)]
            name = f"ADE_{split}_{k + 1:08d}.jpg"
            folder = f"{ADE}/images/ADE/{'validation' if split == 'val' else 'training'}/urban/street"
            classes = choices[rng.integers(0, len(choices), (h // 8 + 1, w // 8 + 1))].repeat(8, 0).repeat(8, 1)[:h, :w]
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / folder / name, quality=95)
            Image.fromarray(seg_png(rng, classes)).save(root / folder / name.replace(".jpg", "_seg.png"))
            folders.append(folder)
            names.append(name)
            if split == "val":
                classes_of[name] = classes
    index = {"folder": folders, "filename": names, "objectnames": np.array(["wall", "sky"]),
             "objectPresence": np.zeros((2, len(names)), dtype=np.uint16)}
    (root / ADE / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    return classes_of


def test_ade847_table_and_names():
    names = read_class_names("ade847")
    assert len(ADE847_ADE_IDS) == len(set(ADE847_ADE_IDS)) == len(names) == get_spec("ade847").num_classes == 847
    assert names[0] == ["wall"] and names[1] == ["building", "edifice"] and names[-1][0] == "adding machine"
    assert [ADE847_ADE_IDS.index(i) for i in HAND_IDS] == list(HAND_IDS.values())
    # three classes start with "bag" (as CAT-Seg lists them): each still gets its own display name
    shown = display_names(names)
    assert len(set(shown)) == 847 and shown[114] == "bag" and shown[191].startswith("bag, traveling bag")


def test_ade847_converter_hand_fixture(tmp_path):
    classes_of = fake_ade_full(tmp_path)
    summary = convert_ade847(tmp_path)
    assert summary == {"val": 2, "written": 2, "skipped": 0}
    out = tmp_path / ADE
    assert not (out / "annotations_detectron2" / "training").exists() or not any(
        (out / "annotations_detectron2" / "training").iterdir())
    lut = {ade_id: train_id for train_id, ade_id in enumerate(ADE847_ADE_IDS)}
    small = read_tif(out / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif")
    expected = np.vectorize(lambda c: lut.get(int(c), 65535))(classes_of["ADE_val_00000001.jpg"])
    np.testing.assert_array_equal(small, expected)  # 40x56: not resized
    for ade_id, train_id in HAND_IDS.items():
        assert (small[classes_of["ADE_val_00000001.jpg"] == ade_id] == train_id).all()
    assert (small[classes_of["ADE_val_00000001.jpg"] == 0] == 65535).all()
    assert (small[classes_of["ADE_val_00000001.jpg"] == NOT_847] == 65535).all()
    # 600x520 (h x w): the short side 520 > 512 shrinks to 512, the long side to round(600 / 520 * 512) = 591
    big = read_tif(out / "annotations_detectron2" / "validation" / "ADE_val_00000002.tif")
    with Image.open(out / "images_detectron2" / "validation" / "ADE_val_00000002.jpg") as im:
        assert im.size == (512, 591) and big.shape == (591, 512)
    # nearest neighbour: every output value is the mapping of some input class
    assert set(np.unique(big)) <= {lut.get(int(c), 65535) for c in np.unique(classes_of["ADE_val_00000002.jpg"])}
    # resumable: a second run skips what exists
    assert convert_ade847(tmp_path)["skipped"] == 2


def test_ade847_converter_equals_catseg_script(tmp_path):
    script = catseg_checkout() / "datasets" / "prepare_ade20k_full.py"
    fake_ade_full(tmp_path / "ours", sizes=((40, 56), (600, 520), (530, 700), (700, 515)))
    shutil.copytree(tmp_path / "ours", tmp_path / "theirs")
    convert_ade847(tmp_path / "ours")
    run_reference(script, tmp_path / "theirs")
    # their table is ours: ids and names in train-id order
    source = (script.parents[1] / "cat_seg/data/datasets/register_ade20k_847.py").read_text()
    table = ast.literal_eval(re.search(r"ADE20K_SEM_SEG_FULL_CATEGORIES = (\[.*?\])\n", source, re.S).group(1))
    assert [c["id"] for c in table] == list(ADE847_ADE_IDS)
    assert [c["name"] for c in table] == class_file_lines("ade847")
    for kind, suffix in (("annotations_detectron2", ".tif"), ("images_detectron2", ".jpg")):
        ours = sorted((tmp_path / "ours" / ADE / kind / "validation").iterdir())
        theirs = sorted((tmp_path / "theirs" / ADE / kind / "validation").iterdir())
        assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 4
        for a, b in zip(ours, theirs):
            assert a.suffix == suffix
            np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)), err_msg=a.name)


def test_ade847_bad_inputs(tmp_path):
    with pytest.raises(ConversionError, match="index_ade20k.pkl: ADE20K full index not found"):
        convert_ade847(tmp_path)
    fake_ade_full(tmp_path)
    (tmp_path / ADE / "images/ADE/validation/urban/street/ADE_val_00000002_seg.png").unlink()
    with pytest.raises(ConversionError, match=r"ADE_val_00000002_seg.png: segmentation PNG not found"):
        convert_ade847(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / ADE / "index_ade20k.pkl").write_bytes(pickle.dumps({"folder": [Evil()], "filename": ["x"]}))
    with pytest.raises(ConversionError, match="cannot read the ADE20K index.*not allowed"):
        convert_ade847(tmp_path)


# -- PC-459 -------------------------------------------------------------------------------------------------------
def fake_pc459(devkit: Path) -> dict[str, np.ndarray]:
    """VOC2010/trainval/<id>.mat (uint16 LabelMap, as the release), labels.txt and CAT-Seg's val list (one id
    without a .mat, which theirs skips); returns the LabelMaps of the val ids."""
    rng = np.random.default_rng(1)
    voc = devkit / "VOC2010"
    (voc / "trainval").mkdir(parents=True)
    (voc / "labels.txt").write_text("".join(f"{i}: class{i}\n" for i in range(1, 460)))
    maps = {}
    for file_id, (h, w) in {"2008_000002": (7, 9), "2008_000003": (300, 500), "2009_000001": (5, 5)}.items():
        label_map = rng.integers(1, 460, (h, w)).astype(np.uint16)
        label_map[0, :3] = (1, 256, 459)  # first class, the first id above uint8, the last class
        savemat(voc / "trainval" / f"{file_id}.mat", {"LabelMap": label_map})
        maps[file_id] = label_map
    (voc / "pascalcontext_val.txt").write_text("2008_000002\n2008_000003\n2008_000004")  # 2009_000001: train
    return {k: v for k, v in maps.items() if k.startswith("2008")}


def test_pc459_converter_hand_fixture(tmp_path):
    maps = fake_pc459(tmp_path / "VOCdevkit")
    with pytest.warns(ConversionWarning, match=r"1 id\(s\) of .*pascalcontext_val.txt have no .mat.*2008_000004"):
        summary = convert_pc459(tmp_path / "VOCdevkit")
    assert summary == {"val": 3, "written": 2, "skipped": 0, "missing": 1}
    out = tmp_path / "VOCdevkit/VOC2010/annotations_detectron2/pc459_val"
    assert sorted(p.name for p in out.iterdir()) == ["2008_000002.tif", "2008_000003.tif"]
    for file_id, label_map in maps.items():
        label = read_tif(out / f"{file_id}.tif")
        np.testing.assert_array_equal(label, label_map.astype(np.int64) - 1)
        assert label[0, :3].tolist() == [0, 255, 458]
    # a 0 in LabelMap (none in the release) wraps to 65535 as in their uint16 arithmetic; 459 is their ignore label
    voc = tmp_path / "VOCdevkit/VOC2010"
    savemat(voc / "trainval/2008_000002.mat", {"LabelMap": np.array([[0, 460, 1]], dtype=np.uint16)})
    convert_pc459(tmp_path / "VOCdevkit", ids=_write(tmp_path / "one.txt", "2008_000002\n"), overwrite=True)
    raw = read_tif(out / "2008_000002.tif")
    assert raw.tolist() == [[65535, 459, 0]]
    assert get_spec("pc459").map_label(raw).tolist() == [[WIDE_IGNORE_INDEX, WIDE_IGNORE_INDEX, 0]]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_pc459_converter_equals_catseg_script(tmp_path):
    script = catseg_checkout() / "datasets" / "prepare_pascal_context_459.py"
    fake_pc459(tmp_path / "ours" / "VOCdevkit")
    shutil.copytree(tmp_path / "ours", tmp_path / "theirs")
    with pytest.warns(ConversionWarning):
        convert_pc459(tmp_path / "ours" / "VOCdevkit")
    run_reference(script, tmp_path / "theirs")
    ours = sorted((tmp_path / "ours/VOCdevkit/VOC2010/annotations_detectron2/pc459_val").iterdir())
    theirs = sorted((tmp_path / "theirs/VOCdevkit/VOC2010/annotations_detectron2/pc459_val").iterdir())
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 2
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(read_tif(a), read_tif(b), err_msg=a.name)
    # their class list is ours (register_pascal_context.py = datasets/pc459.json)
    import json

    assert json.loads((script.parent / "pc459.json").read_text()) == class_file_lines("pc459")
    assert json.loads((script.parent / "ade847.json").read_text()) == class_file_lines("ade847")


def test_pc459_bad_inputs(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    with pytest.raises(ConversionError, match="pascalcontext_val.txt: validation id list not found"):
        convert_pc459(devkit)
    fake_pc459(devkit)
    savemat(devkit / "VOC2010/trainval/2008_000002.mat", {"LabelMap": np.array([[1, 461]], dtype=np.uint16)})
    with pytest.raises(ConversionError, match=r"2008_000002.mat: LabelMap values \[461\] outside 0..460"):
        convert_pc459(devkit, ids=_write(tmp_path / "one.txt", "2008_000002\n"))
    savemat(devkit / "VOC2010/trainval/2008_000002.mat", {"Other": np.ones((2, 2))})
    with pytest.raises(ConversionError, match=r"2008_000002.mat: no 'LabelMap' in the .mat file \(variables: Other\)"):
        convert_pc459(devkit, ids=tmp_path / "one.txt")
    (devkit / "VOC2010/trainval/2008_000002.mat").write_bytes(b"not a mat file")
    with pytest.raises(ConversionError, match="2008_000002.mat: cannot read the .mat file"):
        convert_pc459(devkit, ids=tmp_path / "one.txt")
    assert not list(devkit.rglob("*.tif")) and not list(devkit.rglob("*.tmp"))  # nothing half-written


def test_converters_registered():
    assert {"ade847", "pc459"} <= set(CONVERTERS)


# -- specs, synth, verify -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,classes", [("ade847", 847), ("pc459", 459)])
def test_synth_verify_and_read(tmp_path, name, classes):
    spec = get_spec(name)
    assert spec.num_classes == classes and spec.ignore_index == WIDE_IGNORE_INDEX and spec.seg_suffix == ".tif"
    write_synthetic("context59", tmp_path, num_images=2)  # PC-459 shares JPEGImages with context59: no clash
    ids = write_synthetic(name, tmp_path, num_images=3, seed=3)
    report = verify_dataset(name, tmp_path)
    assert report.found and report.num_images == 3 and not report.problems, report.line()
    assert WIDE_IGNORE_INDEX in report.label_values and max(set(report.label_values) - {WIDE_IGNORE_INDEX}) < classes
    assert "(+65535 ignore)" in report.line()
    assert verify_dataset("context59", tmp_path).num_images == 2 and not verify_dataset("context59", tmp_path).problems
    dataset = SegFileDataset(name, tmp_path)
    assert [s[0] for s in dataset.samples] == ids
    label = dataset[0]["label"]
    assert label.dtype == torch.int64 and int(label[label != WIDE_IGNORE_INDEX].max()) < classes

    # a label value beyond the classes (a wrong class count): one line naming the file
    path = dataset.samples[1][2]
    bad = read_tif(path).copy()
    bad[0, 0] = classes + 1  # PC-459: 459 is its ignore label
    Image.fromarray(bad).save(path, format="TIFF")
    report = verify_dataset(name, tmp_path)
    assert not report.complete and len(report.problems) == 1
    assert f"{path}: raw values [{classes + 1}] outside 0..{classes - 1}" in report.line()
    assert f"({classes} classes)" in report.line()

    # a missing file: one line naming it
    missing = dataset.samples[2][1] if spec.ids_from_labels else dataset.samples[2][2]
    missing.unlink()
    report = verify_dataset(name, tmp_path)
    assert not report.found and str(missing) in report.line() and "\n" not in report.line()


def test_pc459_spec_ignores_its_ignore_label():
    raw = np.array([[0, 255, 458, 459, 65535]], dtype=np.uint16)
    assert get_spec("pc459").map_label(raw).tolist() == [[0, 255, 458, WIDE_IGNORE_INDEX, WIDE_IGNORE_INDEX]]
    assert get_spec("ade847").map_label(raw).tolist() == [[0, 255, 458, 459, WIDE_IGNORE_INDEX]]


# -- the evaluator on 16-bit labels -------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [459, 847])
def test_confusion_matrix_counts_class_255_and_ignores_65535(num_classes):
    rng = np.random.default_rng(num_classes)
    label = rng.integers(0, num_classes, (64, 80))
    label[:5] = 255
    label[-3:] = WIDE_IGNORE_INDEX
    pred = rng.integers(0, num_classes, label.shape)
    keep = label != WIDE_IGNORE_INDEX
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(expected, (label[keep], pred[keep]), 1)
    for device_path in (False, True):
        metric = ConfusionMatrix(num_classes, ignore_index=WIDE_IGNORE_INDEX)
        if device_path:  # the accelerator's path (fixed-size ops), run on the CPU
            flat_label, flat_pred = torch.from_numpy(label).flatten(), torch.from_numpy(pred).flatten()
            counts, invalid = metric.count_without_sync(flat_label, flat_pred)
            np.testing.assert_array_equal(counts.view(num_classes, num_classes).numpy(), expected)
            assert invalid.tolist() == [0, 0]
        else:
            metric.update(torch.from_numpy(pred), torch.from_numpy(label))
            np.testing.assert_array_equal(metric.compute().numpy(), expected)
            assert int(metric.compute()[255].sum()) == int((label == 255).sum())


def assert_scoring_within_chunk_bound(seen: list, num_classes: int, size: tuple[int, int], bound: int) -> None:
    """Both scoring paths (argmax and mask classification) of ``num_classes`` scores at label ``size``, ``seen`` the
    ``interpolate_shapes`` fixture's list: every upsampling call holds at most ``bound`` bytes of channels, never
    all classes, and the 65535 ignore value is one mask among few (not 65536 rows of pooled scores)."""
    height, width = size
    logits = torch.randn(num_classes, 32, 64)
    pred = labels_from_logits(logits, size, torch.arange(num_classes), max_chunk_bytes=bound)
    assert pred.shape == size and int(pred.max()) < num_classes
    label = torch.randint(0, num_classes, (16, 32)).repeat_interleave(height // 16, 0).repeat_interleave(width // 32, 1)
    label[: height // 10] = WIDE_IGNORE_INDEX
    masks_pred = labels_from_masks(logits, size, torch.arange(num_classes), label, max_chunk_bytes=bound)
    assert masks_pred.shape == size
    assert max(s[1] for s in seen) * height * width * 4 <= bound and max(s[1] for s in seen) < num_classes
    metric = ConfusionMatrix(num_classes, ignore_index=WIDE_IGNORE_INDEX)
    metric.update(masks_pred, label)
    assert int(metric.compute().sum()) == int((label != WIDE_IGNORE_INDEX).sum())


@pytest.mark.parametrize("num_classes", [459, 847])
def test_scoring_in_class_chunks(interpolate_shapes, num_classes):
    assert_scoring_within_chunk_bound(interpolate_shapes, num_classes, (128, 256), bound=128 * 256 * 4 * 40)


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [459, 847])
def test_full_resolution_scoring_stays_within_the_memory_bound(interpolate_shapes, num_classes):
    """2048x1024 labels under the evaluator's default bound (64 MiB of channels per upsampling call)."""
    assert_scoring_within_chunk_bound(interpolate_shapes, num_classes, (1024, 2048), bound=64 * 2**20)


def test_mask_classification_with_sparse_ids_equals_dense_ids():
    """Mask ids 65535 and 300 pool exactly as the same masks renumbered 0..k-1 would."""
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(size=(6, 7, 9))).float()
    dense = torch.from_numpy(rng.integers(0, 3, (21, 27)))
    sparse = torch.tensor([4, 300, WIDE_IGNORE_INDEX])[dense]
    a = labels_from_masks(logits, (21, 27), torch.arange(6), dense)
    b = labels_from_masks(logits, (21, 27), torch.arange(6), sparse)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["ade847", "pc459"])
def test_evaluation_session_scores_with_the_datasets_ignore_value(tmp_path, name):
    """``ovseg test``'s session hands each dataset's ignore value to its confusion matrix: class 255 is scored,
    65535 is not; the matrix equals a numpy count of the predictions against the labels."""
    from types import SimpleNamespace

    from ovseg.eval.session import EvaluationSession, EvaluationSettings
    from ovseg.runner import OVSegCLI

    repo = Path(__file__).resolve().parents[2]
    write_synthetic(name, tmp_path, num_images=2, size=(24, 40), seed=7)
    dataset = SegFileDataset(name, tmp_path)
    torch.manual_seed(0)
    method = OVSegCLI(args=["--config", str(repo / "configs/tiny/clip.yaml")], run=False).model.eval()
    host = SimpleNamespace(trainer=SimpleNamespace(datamodule=SimpleNamespace(eval_datasets=[dataset])),
                           device=torch.device("cpu"), encode_text=method.encode_text, modules=method.modules)
    session = EvaluationSession(EvaluationSettings(protocol="maskclip", protocol_overrides={
        "short_side": 32, "templates": "single", "mode": "whole"}, gallery_size=0))
    session.start(host)
    entry = session.evaluator.datasets[name]
    assert entry.metric.ignore_index == WIDE_IGNORE_INDEX and len(entry.vocabulary.class_names) == dataset.num_classes
    samples = [dataset[i] for i in range(len(dataset))]
    for sample in samples:
        sample["label"][:2, :2] = 255  # a class here, not an ignore value
    images = [s["image"].float() / 255 for s in samples]
    labels = [s["label"] for s in samples]
    preds = session.evaluator.predict_batch(method, entry, images, [tuple(x.shape) for x in labels])
    session.evaluator.update(method, name, images, labels)
    expected = np.zeros((dataset.num_classes,) * 2, dtype=np.int64)
    for label, pred in zip(labels, preds):
        keep = label.numpy() != WIDE_IGNORE_INDEX
        np.add.at(expected, (label.numpy()[keep], pred.numpy()[keep]), 1)
    np.testing.assert_array_equal(entry.metric.compute().numpy(), expected)
    assert expected[255].sum() == 8
