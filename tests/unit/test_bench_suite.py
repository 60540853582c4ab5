"""Suite runner with a fake `ovseg test` (no model): resume per entry and per dataset, hashes, folds."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ovseg.bench.metafile import load_metafiles
from ovseg.bench.fingerprint import parse_cli_pairs
from ovseg.bench.suite import SuiteError, load_suite
from ovseg.bench.suite_runner import SuiteRunner
from ovseg.eval.results import aggregate_folds
from ovseg.eval.metrics import scores_from_confusion
from ovseg.eval.results import build_results, dataset_entry

REPO = Path(__file__).resolve().parents[2]


class FakeTest:
    """Stands in for `ovseg test`: writes a results.json like the real one into results_dir."""

    def __init__(self, fail_on=(), interrupt_on=()):
        self.calls: list[dict] = []
        self.fail_on, self.interrupt_on = set(fail_on), set(interrupt_on)

    def __call__(self, args, isolate):
        i = args.index("--config")
        pairs = dict(parse_cli_pairs(args[:i] + args[i + 2:]))
        datasets, out = pairs["data.datasets"], Path(pairs["model.init_args.results_dir"])
        config = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
        call = {"datasets": datasets, "out": out, "args": args, "isolate": isolate, "config": config, "pairs": pairs}
        self.calls.append(call)
        if datasets[0] in self.interrupt_on:
            raise KeyboardInterrupt
        if datasets[0] in self.fail_on:
            raise RuntimeError(f"no images for {datasets[0]}")
        seed = int(pairs.get("seed_everything", config.get("seed_everything", 1)))
        entries = {}
        for name in datasets:
            cm = np.array([[seed + len(name), 1], [2, 5]])
            entries[name] = dataset_entry("maskclip", {}, [["a"], ["b"]], "x", cm, scores_from_confusion(cm), 3)
        res = build_results("MaskCLIP", "w", 1, {"data": {"datasets": datasets}},
                            {"name": "maskclip", "version": 1, "source": "m.yaml"}, entries)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res))


def make_suite(tmp_path, entries, **top):
    cfg = tmp_path / "cfg.yaml"
    if not cfg.exists():
        cfg.write_text("model: {class_path: ovseg.methods.MaskCLIP, init_args: {protocol: maskclip}}\n"
                       "data: {init_args: {datasets: [voc21], num_workers: 0}}\nseed_everything: 1\n")
    suite = {"suite": "t", "vars": {"data_root": "/data"}, "defaults": {"data.init_args.root": "${data_root}"},
             "output": str(tmp_path / "out"), "entries": entries, **top}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def run(path, fake, **kw):
    runner = SuiteRunner(load_suite(path, **{k: kw.pop(k) for k in ("variables", "extra_args") if k in kw}),
                         run_fn=fake, log=lambda m: None, **kw)
    return runner, runner.run()


def test_resume_after_interruption_recomputes_only_unfinished_datasets(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    path = make_suite(tmp_path, [{"name": "a", "config": cfg, "overrides": {"data.init_args.datasets":
                                                                            ["voc21", "voc20", "ade150"]}},
                                 {"name": "b", "config": cfg}])
    fake = FakeTest(interrupt_on={"voc20"})
    with pytest.raises(KeyboardInterrupt):
        run(path, fake)
    assert [c["datasets"] for c in fake.calls] == [["voc21"], ["voc20"]]
    assert (tmp_path / "out/a/parts/voc21/results.json").is_file()
    fake = FakeTest()
    runner, outcomes = run(path, fake)
    assert [c["datasets"] for c in fake.calls] == [["voc20"], ["ade150"], ["voc21"]]  # a: 2 left; b: 1
    assert [o.status for o in outcomes] == ["done", "done"]
    merged = json.loads((tmp_path / "out/a/results.json").read_text())
    assert list(merged["datasets"]) == ["voc21", "voc20", "ade150"]
    assert merged["config"]["data"]["datasets"] == ["voc21", "voc20", "ade150"]
    assert merged["bench"]["complete"] is True and merged["bench"]["role"] == "entry"
    assert (tmp_path / "out/a/results.md").read_text().startswith("# MaskCLIP")
    # the runner's arguments: the data root variable, one dataset, its own folders; datasets override dropped
    args = fake.calls[0]["pairs"]
    assert args["data.init_args.root"] == "/data" and "data.init_args.datasets" not in args
    assert args["trainer.logger.init_args.save_dir"] == str(tmp_path / "out/a/parts/voc20")
    assert (tmp_path / "out/a/commands.txt").read_text().count("ovseg test --config") == 3
    # everything finished: nothing runs
    fake = FakeTest()
    _, outcomes = run(path, fake)
    assert fake.calls == [] and [o.status for o in outcomes] == ["skipped", "skipped"]
    # --force reruns
    fake = FakeTest()
    run(path, fake, force=True, only=["b"])
    assert [c["datasets"] for c in fake.calls] == [["voc21"]]


def test_a_failing_dataset_does_not_stop_the_suite(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    two = {"data.init_args.datasets": ["voc21", "ade150"]}
    path = make_suite(tmp_path, [{"name": "a", "config": cfg, "overrides": two}, {"name": "b", "config": cfg}])
    fake = FakeTest(fail_on={"voc21"})
    _, outcomes = run(path, fake)
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert "no images for voc21" in (tmp_path / "out/a/error.txt").read_text()
    partial = json.loads((tmp_path / "out/a/results.json").read_text())
    assert list(partial["datasets"]) == ["ade150"] and partial["bench"]["complete"] is False
    fake = FakeTest()
    _, outcomes = run(path, fake)
    assert [c["datasets"] for c in fake.calls] == [["voc21"], ["voc21"]]
    assert [o.status for o in outcomes] == ["done", "done"] and not (tmp_path / "out/a/error.txt").exists()


def test_config_hash_covers_settings_not_locations(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    path = make_suite(tmp_path, [{"name": "a", "config": cfg}])
    base = load_suite(path).entries[0].entry_hash()
    same = [load_suite(path, variables={"data_root": "/elsewhere"}),
            load_suite(path, extra_args=["--data.num_workers", "8", "--trainer.devices=1",
                                         "--trainer.logger.init_args.save_dir", "x"]),
            load_suite(path, extra_configs=[str(REPO / "configs/logger/wandb.yaml")])]
    assert all(s.entries[0].entry_hash() == base for s in same)
    changed = [load_suite(path, extra_args=["--model.init_args.protocol_overrides", "{short_side: 320}"]),
               load_suite(path, extra_args=["--data.datasets=[voc20]"]),
               load_suite(path, extra_args=["--data.limit", "2"])]
    assert all(s.entries[0].entry_hash() != base for s in changed)
    (tmp_path / "cfg.yaml").write_text((tmp_path / "cfg.yaml").read_text().replace("protocol: maskclip",
                                                                                   "protocol: sclip"))
    assert load_suite(path).entries[0].entry_hash() != base
    # a changed configuration reruns and never leaves the old numbers looking current
    fake = FakeTest()
    run(path, fake)
    cfg_text = (tmp_path / "cfg.yaml").read_text()
    (tmp_path / "cfg.yaml").write_text(cfg_text.replace("seed_everything: 1", "seed_everything: 7"))
    fake = FakeTest(fail_on={"voc21"})
    run(path, fake)
    assert len(fake.calls) == 1 and not (tmp_path / "out/a/results.json").exists()


def test_fold_entry_is_one_entry_reported_as_mean_and_std(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    folds = [{"name": f"fold{i}", "config": cfg, "overrides": {"seed_everything": s}}
             for i, s in enumerate([1, 3, 5, 7])]
    path = make_suite(tmp_path, [{"name": "kfold", "folds": folds,
                                  "overrides": {"data.init_args.datasets": ["context59"]}}])
    fake = FakeTest()
    _, outcomes = run(path, fake)
    assert len(fake.calls) == 4 and outcomes[0].status == "done"
    res = json.loads((tmp_path / "out/kfold/results.json").read_text())
    folds_res = {f"fold{i}": json.loads((tmp_path / f"out/kfold/fold{i}/results.json").read_text()) for i in range(4)}
    values = [folds_res[f]["datasets"]["context59"]["mIoU"] for f in folds_res]
    d = res["datasets"]["context59"]
    assert d["mIoU"] == pytest.approx(round(float(np.mean(values)), 2))
    assert d["std"]["mIoU"] == pytest.approx(round(float(np.std(values)), 2)) and d["std"]["mIoU"] > 0
    assert list(d["folds"]) == ["fold0", "fold1", "fold2", "fold3"] and res["bench"]["folds_done"] == list(d["folds"])
    assert "mean ± std" in (tmp_path / "out/kfold/results.md").read_text()
    fake = FakeTest()
    _, outcomes = run(path, fake)
    assert fake.calls == [] and outcomes[0].status == "skipped"
    same = aggregate_folds({"a": folds_res["fold0"], "b": folds_res["fold0"]})
    assert same["datasets"]["context59"]["std"]["mIoU"] == 0


def test_entries_from_metafiles_and_reasons_not_to_run(tmp_path):
    metas = load_metafiles(REPO / "benchmarks/metafiles")
    path = make_suite(tmp_path, [
        {"from": "maskclip_vitb16/maskclip", "also": ["maskclip_vitb16/context59_unknown"]},
        {"from": "pixelclip_vitb16_sa1b/paper", "overrides": {"ckpt_path": "${weights_dir}/p.ckpt"}},
        {"from": "clips4_vitb16/coco_stuff", "overrides": {"ckpt_path": "${weights_dir}/clips4_coco_stuff.ckpt"}},
    ], vars={"data_root": "/d", "weights_dir": str(tmp_path / "w")})
    suite = load_suite(path, metafiles=metas)
    a, b, c = suite.entries
    assert a.name == "maskclip_vitb16.maskclip" and a.evaluations == ["maskclip_vitb16/maskclip",
                                                                       "maskclip_vitb16/context59_unknown"]
    assert a.runs[0].configs == [REPO / "configs/eval/maskclip_vitb16.yaml"]
    assert a.runs[0].datasets == ["voc20", "context59", "coco_stuff171"]
    assert b.not_runnable.startswith(f"checkpoint not found: {tmp_path / 'w'}/p.ckpt")
    assert c.not_runnable.startswith(f"checkpoint not found: {tmp_path / 'w'}/clips4_coco_stuff.ckpt")
    fake = FakeTest()
    _, outcomes = run(path, fake, only=["pixelclip*", "clips4*"])
    assert fake.calls == [] and [o.status for o in outcomes] == ["not runnable", "not runnable"]
    # the run reproduces both evaluations: recorded for the report
    (tmp_path / "w").mkdir()
    _, outcomes = run(path, FakeTest(), only=["maskclip*"], variables={"data_root": "/d"})
    bench = json.loads((tmp_path / "out/maskclip_vitb16.maskclip/results.json").read_text())["bench"]
    assert bench["evaluations"] == a.evaluations


def test_distributed_entries_run_in_a_subprocess(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    path = make_suite(tmp_path, [{"name": "a", "config": cfg, "overrides": {"trainer.devices": 2,
                                                                            "trainer.strategy": "ddp"}}])
    fake = FakeTest()
    run(path, fake)
    assert fake.calls[0]["isolate"] is True


@pytest.mark.parametrize("entries, message", [
    ([{"config": "x.yaml"}], "give a name"),
    ([{"name": "a b", "config": "x.yaml"}], "use letters, digits"),
    ([{"name": "a", "config": "x.yaml"}, {"name": "a", "config": "x.yaml"}], "duplicate entry names ['a']"),
    ([{"name": "a", "config": "x.yaml", "overrides": {"data.init_args.root": "${nope}"}}], "unknown variable ${nope}"),
    ([{"from": "nope/x"}], "no metafile 'nope'"),
    ([{"from": "maskclip_vitb16/nope"}], "has no evaluation 'nope'"),
    ([{"name": "a", "config": "x.yaml", "typo": 1}], "unknown key(s) ['typo']"),
])
def test_suite_errors_name_the_file(tmp_path, entries, message):
    path = make_suite(tmp_path, entries)
    with pytest.raises(SuiteError) as info:
        load_suite(path, metafiles=load_metafiles(REPO / "benchmarks/metafiles"))
    assert str(path) in str(info.value) and message in str(info.value)


def test_unsplit_suite_runs_each_entry_once(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    path = make_suite(tmp_path, [{"name": "a", "config": cfg,
                                  "overrides": {"data.init_args.datasets": ["voc21", "voc20"]}}],
                      split_datasets=False)
    fake = FakeTest()
    run(path, fake)
    assert [c["datasets"] for c in fake.calls] == [["voc21", "voc20"]]
    assert list(json.loads((tmp_path / "out/a/results.json").read_text())["datasets"]) == ["voc21", "voc20"]
    fake = FakeTest()
    run(path, fake)
    assert fake.calls == []


def test_results_are_reused_only_for_the_same_data_and_weights(tmp_path):
    """Finding 0 of the fault review: another data root, a touched image or a checkpoint replaced at the same path
    reruns the entry; the same files copied elsewhere (times kept) do not."""
    import os
    import shutil

    from ovseg.data.synthetic import write_synthetic

    write_synthetic("voc21", tmp_path / "data", num_images=3, seed=0)
    write_synthetic("voc21", tmp_path / "other", num_images=3, seed=9)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"step 5")
    cfg = str(tmp_path / "cfg.yaml")
    path = make_suite(tmp_path, [{"name": "a", "config": cfg, "overrides": {"ckpt_path": str(ckpt)}}])

    def calls(root: Path) -> int:
        fake = FakeTest()
        run(path, fake, variables={"data_root": str(root)})
        return len(fake.calls)

    assert calls(tmp_path / "data") == 1
    assert calls(tmp_path / "data") == 0  # up to date
    ckpt.write_bytes(b"step 40")  # the same path, other weights
    assert calls(tmp_path / "data") == 1
    assert calls(tmp_path / "other") == 1  # other data
    assert calls(tmp_path / "data") == 1  # and back
    image = next((tmp_path / "data/VOCdevkit/VOC2012/JPEGImages").iterdir())
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched (e.g. rewritten in place)
    assert calls(tmp_path / "data") == 1
    shutil.copytree(tmp_path / "data", tmp_path / "moved")  # copy2: sizes and times kept
    assert calls(tmp_path / "moved") == 0


def test_a_run_scores_the_datasets_ovseg_test_parses(tmp_path):
    """The data group given as a file (``--data FILE``): the suite reads it as ``ovseg test`` does, through
    LightningCLI's parser, and scores its datasets (not the DataModule's default voc21)."""
    data = tmp_path / "data.yaml"
    data.write_text("class_path: ovseg.data.datamodule.OVSegDataModule\n"
                    "init_args: {datasets: [voc20, ade150], root: /d, num_workers: 0}\n")
    path = make_suite(tmp_path, [{"name": "a", "config": str(tmp_path / "cfg.yaml"), "overrides": {"data": str(data)}}])
    assert load_suite(path).entries[0].runs[0].datasets == ["voc20", "ade150"]
    fake = FakeTest()
    run(path, fake)
    assert [c["datasets"] for c in fake.calls] == [["voc20"], ["ade150"]]


def test_settings_ovseg_test_refuses_make_the_entry_not_runnable(tmp_path):
    cfg = str(tmp_path / "cfg.yaml")
    path = make_suite(tmp_path, [{"name": "typo", "config": cfg, "overrides": {"model.init_args.protocl": "sclip"}},
                                 {"name": "ok", "config": cfg}])
    typo, ok = load_suite(path).entries
    assert "ovseg test refuses its settings" in typo.not_runnable and "'protocl' is not accepted" in typo.not_runnable
    assert ok.not_runnable is None
    fake = FakeTest()
    _, outcomes = run(path, fake)
    assert [o.status for o in outcomes] == ["not runnable", "done"] and len(fake.calls) == 1


def test_ovseg_test_takes_configs_only_suites_are_bench_run(tmp_path, capsys):
    path = make_suite(tmp_path, [{"name": "a", "config": str(tmp_path / "cfg.yaml")}])
    from ovseg.cli import main

    with pytest.raises(SystemExit):
        main(["test", "--config", str(path)])
    assert "does not accept option" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_freshness_key_covers_every_file_a_run_reads_and_the_code(tmp_path, monkeypatch):
    """Issue 26 §3: a protocol YAML given by path edited, a ``clip.pretrained`` file replaced at the same path, a
    dict dataset's mask or class-name file changed, ovseg's code changed at the same version: each reruns."""
    import os

    import ovseg.bench.suite as suite_module
    from ovseg.bench.fingerprint import code_fingerprint

    protocol = tmp_path / "my_protocol.yaml"
    protocol.write_text((REPO / "ovseg/eval/protocols/maskclip.yaml").read_text())
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"weights one")
    masks = tmp_path / "my_set" / "masks"
    masks.mkdir(parents=True)
    (masks / "a.png").write_bytes(b"mask one")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    entry = {"name": "mine", "hf": {"path": "imagefolder", "data_dir": "my_set"}, "class_names": "names.txt",
             "split": "train"}
    path = make_suite(tmp_path, [{"name": "a", "config": str(tmp_path / "cfg.yaml"), "overrides": {
        "model.init_args.protocol": str(protocol), "model.init_args.clip": {"pretrained": str(weights)},
        "data.init_args.datasets": [entry]}}], vars={"data_root": str(tmp_path)})

    def key() -> str:
        entry_ = load_suite(path).entries[0]
        return entry_.entry_hash() + entry_.runs[0].part_hash(entry)

    def bumped(file: Path, text: bytes) -> None:  # rewritten in place (a new mtime, as an editor gives)
        file.write_bytes(text)
        stat = file.stat()
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    assert key() == key()  # nothing changed: reused
    for edit in (lambda: protocol.write_text(protocol.read_text().replace("short_side: 512", "short_side: 448")),
                 lambda: weights.write_bytes(b"weights two"),  # same size, same path
                 lambda: bumped(masks / "a.png", b"mask two"),
                 lambda: bumped(tmp_path / "names.txt", b"cat\nsky\n")):
        before = key()
        edit()
        assert key() != before
    before = key()
    monkeypatch.setattr(suite_module, "code_fingerprint", lambda: "other code, same version")
    assert key() != before
    # the code hash is the package's files: one changed file changes it
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("x = 1\n")
    first = code_fingerprint(package)
    (package / "m.py").write_text("x = 2\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(package) != first
