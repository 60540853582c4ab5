"""`ovseg bench matrix` with a fake `ovseg test` (no model): what a cell replaces, resume and fresh-check per cell,
the tables (own cell, differences, paper numbers, protocols that cannot score a dataset) and the RESULTS.md section."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from ovseg.bench.fingerprint import parse_cli_pairs
from ovseg.bench.matrix import cannot_score, matrix_markdown, plan_matrix, read_matrix, run_matrix
from ovseg.bench.metafile import load_metafiles
from ovseg.bench.report import build_report
from ovseg.bench.suite import SuiteError
from ovseg.eval.metrics import scores_from_confusion
from ovseg.eval.protocols import load_protocol
from ovseg.eval.results import build_results, dataset_entry

REPO = Path(__file__).resolve().parents[2]


class FakeTest:
    """Stands in for `ovseg test`: a confusion matrix that depends on the config, protocol and dataset, so every
    cell has its own score."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []  # (config stem, protocol or "own", dataset)

    def __call__(self, args, isolate):
        config = Path(args[args.index("--config") + 1])
        pairs = dict(parse_cli_pairs(args[:args.index("--config")] + args[args.index("--config") + 2:]))
        protocol = str(pairs.get("model.init_args.protocol", "own"))
        out, datasets = Path(pairs["model.init_args.results_dir"]), pairs["data.datasets"]
        self.calls += [(config.stem, Path(protocol).stem, d) for d in datasets]
        entries = {}
        for name in datasets:
            seed = zlib.crc32(f"{config.read_text()}|{protocol}|{name}".encode()) % 50
            cm = np.array([[10 + seed, 3], [5, 20]])
            entries[name] = dataset_entry(protocol, {}, [["a"], ["b"]], "x", cm, scores_from_confusion(cm), 2)
        res = build_results("MaskCLIP", "w", 1, {}, {"name": protocol, "version": 1, "source": "p.yaml"}, entries)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res))


def write_config(path, protocol, last_block="value", overrides=None):
    init = {"protocol": protocol, "clip": {"name": "tiny-vit", "pretrained": None, "last_block": last_block}}
    if overrides:
        init["protocol_overrides"] = overrides
    path.write_text(json.dumps({"model": {"class_path": "ovseg.methods.MaskCLIP", "init_args": init},
                                "data": {"init_args": {"datasets": ["voc21", "voc20"], "num_workers": 0}}}))
    return str(path)


def test_a_cell_replaces_the_protocol_and_its_overrides_and_nothing_else(tmp_path):
    a = write_config(tmp_path / "a.yaml", "maskclip", "value", {"short_side": 64, "pamr_steps": 2})
    b = write_config(tmp_path / "b.yaml", "naclip", "vanilla")
    matrix = plan_matrix([a, b], ["sclip"], tmp_path / "out", data_root="/data", metafiles={})
    # each method's own protocol is a column even when not asked for
    assert list(matrix.protocols) == ["sclip", "maskclip", "naclip"]
    assert matrix.datasets == ["voc21", "voc20"]
    runs = {name: entry.runs[0] for name, entry in ((e.name, e) for e in matrix.suite.entries)}
    for (method, last_block, own), column in [(m, c) for m in (("a", "value", "maskclip"), ("b", "vanilla", "naclip"))
                                              for c in matrix.protocols]:
        run = runs[f"{method}--{column}"]
        assert run.setting("model.protocol") == column
        assert run.setting("model.clip.last_block") == last_block  # the model stays the method's
        assert run.setting("data.root") == "/data" and run.setting("data.datasets") == ["voc21", "voc20"]
        expected = {"short_side": 64, "pamr_steps": 2} if (method, column) == ("a", "maskclip") else {}
        assert (run.setting("model.protocol_overrides") or {}) == expected, (method, column)
        assert matrix.cells[f"{method}--{column}"].own == (column == own)


def test_cells_resume_and_only_changed_cells_rerun(tmp_path):
    a = write_config(tmp_path / "a.yaml", "maskclip")
    b = write_config(tmp_path / "b.yaml", "maskclip", "vanilla")
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\nextends: sclip\ndefaults: {logit_scale: 30}\n")

    def run(**kw):
        fake = FakeTest()
        matrix = plan_matrix([a, b], ["sclip", str(mine)], tmp_path / "out", metafiles={}, datasets=["voc20"])
        run_matrix(matrix, run_fn=fake, log=lambda m: None, **kw)
        return sorted(fake.calls)

    assert run() == sorted((m, p, "voc20") for m in ("a", "b") for p in ("sclip", "mine", "own"))
    assert (tmp_path / "out/a/mine/results.json").is_file() and (tmp_path / "out/MATRIX.md").is_file()
    assert run() == []  # finished cells whose hashes match are skipped
    mine.write_text("name: mine\nextends: sclip\ndefaults: {logit_scale: 20}\n")  # a protocol file changes
    assert run() == [("a", "mine", "voc20"), ("b", "mine", "voc20")]
    write_config(tmp_path / "b.yaml", "maskclip", "qq")  # a method's config changes
    assert run() == [("b", "mine", "voc20"), ("b", "own", "voc20"), ("b", "sclip", "voc20")]
    assert run(force=True) == sorted((m, p, "voc20") for m in ("a", "b") for p in ("sclip", "mine", "own"))


def test_tables_mark_the_own_cell_show_differences_paper_numbers_and_unscorable_datasets(tmp_path):
    metafiles = load_metafiles(REPO / "benchmarks" / "metafiles")
    tiny = write_config(tmp_path / "tiny.yaml", "maskclip")
    matrix = plan_matrix(["maskclip_vitb16/maskclip", tiny], ["sclip"], tmp_path / "out", metafiles=metafiles,
                         datasets=["voc20", "toyworld"])
    assert matrix.cannot_score == {"sclip": {"toyworld": "class-name file 'sclip/toyworld' not found"}}
    assert "maskclip_vitb16.maskclip--sclip" in matrix.cells
    assert matrix.cells["maskclip_vitb16.maskclip--sclip"].datasets == ["voc20"]  # toyworld left out of the cell
    run_matrix(matrix, run_fn=FakeTest(), log=lambda m: None)
    record = read_matrix(tmp_path / "out" / "matrix.json")
    score = lambda m, p, d: json.loads((tmp_path / "out" / m / p / "results.json").read_text())[  # noqa: E731
        "datasets"][d]["mIoU"]
    md = matrix_markdown(record)
    lines = md.splitlines()
    voc20 = lines[lines.index("## voc20") + 2:lines.index("## voc20") + 6]
    assert voc20[0] == "| method | own protocol | paper | `sclip` | `maskclip` |"
    paper = metafiles["maskclip_vitb16"].evaluation("maskclip").results["voc20"]["mIoU"].value
    own, other = score("maskclip_vitb16.maskclip", "maskclip", "voc20"), score("maskclip_vitb16.maskclip", "sclip",
                                                                               "voc20")
    assert voc20[2] == (f"| maskclip_vitb16.maskclip · `maskclip_vitb16/maskclip` | `maskclip` | {paper:g} | "
                        f"{other:.2f} ({other - own:+.2f}) | **{own:.2f}** ★ |")
    assert voc20[3].startswith("| tiny | `maskclip` | — | ")
    toy = lines[lines.index("## toyworld") + 2:]
    assert toy[2].split(" | ")[3] == "n/a" and "★" in toy[2].split(" | ")[4]
    assert "- `sclip` cannot score toyworld: class-name file 'sclip/toyworld' not found" in lines
    # an unfinished cell is marked, and the report renders the matrix, never its cells as rows of their own
    (tmp_path / "out/tiny/sclip/results.json").unlink()
    assert "| — ◐ |" in matrix_markdown(read_matrix(tmp_path / "out" / "matrix.json"))
    report = build_report(metafiles, [tmp_path / "out"])
    text = report.markdown()
    assert "## Protocol matrix" in text and f"### `{tmp_path / 'out'}`" in text and "#### voc20" in text
    assert not report.unmatched and not any("matrix" in n for n in report.notes)


def test_own_names_scores_a_dataset_the_protocol_has_no_list_for_with_its_own_names(tmp_path):
    """``own_names``: the toy world (no `sclip/` list) gets a cell of its own whose protocol_overrides give the
    dataset's own names, marked †; voc20 (listed) keeps the protocol's names in the other cell; a class count that
    differs would still be n/a."""
    tiny = write_config(tmp_path / "tiny.yaml", "maskclip")
    matrix = plan_matrix([tiny], ["sclip"], tmp_path / "out", metafiles={}, datasets=["voc20", "toyworld"],
                         own_names=True)
    assert matrix.cannot_score == {}
    assert matrix.own_names == {"sclip": {"toyworld": "class-name file 'sclip/toyworld' not found"}}
    listed, renamed = matrix.cells["tiny--sclip"], matrix.cells["tiny--sclip--own-names"]
    assert listed.datasets == ["voc20"] and not listed.own_names
    assert renamed.datasets == ["toyworld"] and renamed.own_names
    assert "tiny--maskclip--own-names" not in matrix.cells  # the own protocol reads the toy names already
    fake, names = FakeTest(), {}

    def run_fn(args, isolate):
        pairs = dict(parse_cli_pairs(args[:args.index("--config")] + args[args.index("--config") + 2:]))
        names[(str(pairs.get("model.init_args.protocol", "own")), *pairs["data.datasets"])] = pairs.get(
            "model.init_args.protocol_overrides")
        fake(args, isolate)

    run_matrix(matrix, run_fn=run_fn, log=lambda m: None)
    assert names == {("sclip", "toyworld"): {"class_names": "{dataset}"}, ("sclip", "voc20"): {},
                     ("own", "toyworld"): None, ("own", "voc20"): None}
    assert sorted(fake.calls) == [("tiny", "own", "toyworld"), ("tiny", "own", "voc20"), ("tiny", "sclip", "toyworld"),
                                  ("tiny", "sclip", "voc20")]
    assert (tmp_path / "out/tiny/sclip-own-names/results.json").is_file()
    lines = matrix_markdown(read_matrix(tmp_path / "out" / "matrix.json")).splitlines()
    toy, voc = lines[lines.index("## toyworld") + 4], lines[lines.index("## voc20") + 4]
    assert toy.split(" | ")[3].endswith(" †") and "†" not in voc
    assert ("- † `sclip` has no class-name list for toyworld (class-name file 'sclip/toyworld' not found): its cells "
            "read the dataset's own names") in lines
    # without it, the toy world stays out
    assert plan_matrix([tiny], ["sclip"], tmp_path / "o2", metafiles={}, datasets=["voc20", "toyworld"]).cannot_score


def test_cannot_score_is_the_evaluators_check():
    assert cannot_score(load_protocol("maskclip"), "toyworld") is None  # its own names
    assert cannot_score(load_protocol("sclip"), "voc21") is None
    assert "sclip/toyworld" in cannot_score(load_protocol("naclip"), "toyworld")


@pytest.mark.parametrize("methods, message", [
    (["nope/x"], "no metafile 'nope'"),
    (["maskclip_vitb16/nope"], "has no evaluation 'nope'"),
    (["clips4_vitb16/context59_unknown_4fold"], "k-fold"),
    (["configs/eval/missing.yaml"], "config file not found"),
    (["maskclip_vitb16"], "name one"),
])
def test_bad_methods_are_named(tmp_path, methods, message):
    with pytest.raises(SuiteError, match=message):
        plan_matrix(methods, [], tmp_path, metafiles=load_metafiles(REPO / "benchmarks" / "metafiles"))
