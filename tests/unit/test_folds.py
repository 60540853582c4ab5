"""4-fold unknown-class vocabularies of CLIP-S4: Pascal Context (the spec's folds) and the toy world's."""

import pytest

from ovseg.data.classnames import read_class_names
from ovseg.data.folds import (ALIASES, CONTEXT_FOLDS, alphabetical_folds, fold_classes, known_classes,
                              resolve_vocabulary)

SPEC = [  # CLIP-S4's four Pascal Context folds, typed in from the project's CLIP-S4 spec
    "airplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, cabinet, car, cat",
    "ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, floor, flower, food, grass, ground",
    "horse, keyboard, light, motorbike, mountain, mouse, person, plate, platform, potted plant, road, rock, sheep, "
    "shelves, sidewalk",
    "sign, sky, snow, sofa, table, track, train, tree, truck, tv monitor, wall, water, window, wood",
]


def test_folds_are_exactly_the_spec_in_pc59_order():
    assert [list(f) for f in CONTEXT_FOLDS] == [s.split(", ") for s in SPEC]
    assert [len(f) for f in CONTEXT_FOLDS] == [15, 15, 15, 14]
    pc59 = [c[0] for c in read_class_names("context59")]
    assert len(pc59) == 59
    assert [ALIASES.get(n, n) for f in CONTEXT_FOLDS for n in f] == pc59
    assert sum((fold_classes(i) for i in range(4)), []) == pc59


@pytest.mark.parametrize("fold", range(4))
def test_known_classes_are_the_other_three_folds(fold):
    pc59 = [c[0] for c in read_class_names("context59")]
    known, held_out = known_classes(fold), fold_classes(fold)
    assert not set(known) & set(held_out)
    assert known == [n for n in pc59 if n not in held_out]
    assert len(known) == 59 - len(held_out)
    assert resolve_vocabulary(f"context59-fold{fold}") == known


def test_the_toy_rule_reproduces_the_context_folds():
    # the toy folds come from a rule; the spec's Pascal Context folds are that rule applied to PC-59
    pc59 = [c[0] for c in read_class_names("context59")]
    spec_spelling = {v: k for k, v in ALIASES.items()}
    assert alphabetical_folds([spec_spelling.get(n, n) for n in pc59]) == CONTEXT_FOLDS


def test_toyworld_folds():
    toy = [c[0] for c in read_class_names("toyworld")]
    folds = [fold_classes(i, "toyworld") for i in range(4)]
    assert [len(f) for f in folds] == [5, 5, 4, 4]
    assert sorted(sum(folds, [])) == sorted(toy) and len(toy) == 18
    assert folds[0] == ["ball", "box", "car", "cloud", "fish"]  # hand-checked: alphabetical, consecutive
    assert folds[3] == ["sun", "tree", "wall", "water"]
    for i, held_out in enumerate(folds):
        known = resolve_vocabulary(f"toyworld-fold{i}")
        assert known == [n for n in toy if n not in held_out]
    with pytest.raises(ValueError, match="no unknown-class folds"):
        fold_classes(0, "voc20")


def test_resolve_vocabulary():
    assert resolve_vocabulary("voc20")[:2] == ["aeroplane", "bicycle"] and len(resolve_vocabulary("voc20")) == 20
    assert resolve_vocabulary("voc21") == resolve_vocabulary("voc20")  # background is never a known class
    assert resolve_vocabulary(["cat", "dog"]) == ["cat", "dog"]
    with pytest.raises(ValueError):
        fold_classes(4)


def test_fold_report_mean_std_from_results_files(tmp_path):
    import json

    import numpy as np

    from ovseg.bench.folds import METRICS, fold_table, format_table, write_report

    rng = np.random.default_rng(0)
    values = rng.uniform(10, 60, size=(4, 5)).round(2)
    paths = []
    for i, (miou, pacc, macc, unk, kn) in enumerate(values):
        entry = {"mIoU": miou, "pAcc": pacc, "mAcc": macc, "unknown_mIoU": unk, "known_mIoU": kn,
                 "hIoU": round(2 * unk * kn / (unk + kn), 2), "unknown_classes": fold_classes(i)}
        path = tmp_path / f"f{i}.json"
        path.write_text(json.dumps({"datasets": {"context59": entry}}))
        paths.append(path)
    table = fold_table(paths)
    for j, key in enumerate(["mIoU", "pAcc", "mAcc", "unknown_mIoU", "known_mIoU"]):
        assert table["mean"][key] == pytest.approx(values[:, j].mean(), abs=0.006)
        assert table["std"][key] == pytest.approx(values[:, j].std(), abs=0.006)
    h = 2 * values[:, 3] * values[:, 4] / (values[:, 3] + values[:, 4])
    assert table["mean"]["hIoU"] == pytest.approx(h.mean(), abs=0.01)
    md = format_table(table)
    assert md.count("\n| ") == 6 and all(title in md for _, title in METRICS) and " ± " in md
    sample = fold_table(paths, ddof=1)  # the sample std on request
    assert sample["std"]["mIoU"] == pytest.approx(values[:, 0].std(ddof=1), abs=0.006)
    assert sample["mean"] == table["mean"]
    write_report(paths, tmp_path / "out")
    assert json.loads((tmp_path / "out/report.json").read_text())["mean"] == table["mean"]
    with pytest.raises(KeyError, match="unknown_mIoU"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"datasets": {"context59": {"mIoU": 1.0}}}))
        fold_table([bad])
