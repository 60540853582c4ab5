"""``ovseg bench run | report | validate``.

    ovseg bench run baselines --data-root /data/ovseg          # every entry; finished ones are skipped
    ovseg bench run paper --var weights_dir=/ckpt --only 'pixelclip*' --set trainer.devices=1
    ovseg bench report --results outputs/bench --out benchmarks/
    ovseg bench validate                                       # metafiles, their cited numbers, suites
    ovseg bench matrix --methods sclip_vitb16/sclip configs/eval/naclip_vitb16.yaml --protocols sclip naclip \
        --data-root /data/ovseg --out outputs/bench/matrix    # every method under every protocol
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse_vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--var {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def _split_extra(extra: list[str]) -> tuple[list[str], list[str]]:
    """Extra `ovseg test` arguments -> (extra config files, the other arguments)."""
    extra = list(extra or [])
    configs, rest, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if arg in ("--config", "-c") and i + 1 < len(extra):
            configs.append(extra[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return configs, rest


def run_suite(suite: str, extra: list[str] | None = None, variables: dict | None = None, out: str | None = None,
              force: bool = False, isolate: bool = False, only: list[str] | None = None, fail_fast: bool = False,
              dry_run: bool = False, report: str | None = None, metafiles: str | None = None) -> int:
    from ovseg.bench.metafile import load_metafiles
    from ovseg.bench.suite import load_suite, resolve_suite_path
    from ovseg.bench.suite_runner import SuiteRunner

    path = resolve_suite_path(suite)
    extra_configs, extra_args = _split_extra(extra or [])
    metas = load_metafiles(metafiles) if metafiles else None
    loaded = load_suite(path, variables=variables, extra_args=extra_args, metafiles=metas,
                        extra_configs=extra_configs)
    runner = SuiteRunner(loaded, out=out, force=force, isolate=isolate, only=only, fail_fast=fail_fast)
    if dry_run:
        print(f"suite {loaded.name!r} ({loaded.path}) -> {runner.out}")
        for entry in runner.selected():
            why = f" — {entry.not_runnable}" if entry.not_runnable else ""
            print(f"- {entry.name}: {runner.status(entry)}{why}")
            for cmd in runner.commands(entry):
                print(f"    {cmd}")
        return 0
    outcomes = runner.run()
    if report is not None:
        from ovseg.bench.metafile import load_metafiles as _load
        from ovseg.bench.report import build_report, write_report

        md, csv_path = write_report(build_report(metas or _load(), [runner.out], parity_dir=report), report)
        print(f"bench: report {md} and {csv_path}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _cmd_run(ns: argparse.Namespace) -> int:
    variables = _parse_vars(ns.var)
    if ns.data_root:
        variables["data_root"] = ns.data_root
    extra = [f"--{kv.lstrip('-')}" for kv in ns.set]
    for kv in ns.set:
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected KEY=VALUE, e.g. trainer.devices=2")
    extra += [a for c in ns.config for a in ("--config", c)]
    return run_suite(ns.suite, extra=extra, variables=variables, out=ns.out, force=ns.force, isolate=ns.isolate,
                     only=ns.only, fail_fast=ns.fail_fast, dry_run=ns.dry_run, report=ns.report,
                     metafiles=ns.metafiles)


def _cmd_matrix(ns: argparse.Namespace) -> int:
    from ovseg.bench.matrix import MatrixRunner, plan_matrix, run_matrix
    from ovseg.bench.metafile import load_metafiles

    extra = [f"--{kv.lstrip('-')}" for kv in ns.set]
    for kv in ns.set:
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected KEY=VALUE, e.g. trainer.devices=2")
    matrix = plan_matrix(ns.methods, ns.protocols, ns.out, data_root=ns.data_root, datasets=ns.datasets,
                         metafiles=load_metafiles(ns.metafiles), extra_args=extra, extra_configs=ns.config,
                         own_names=ns.own_names)
    runner_args = {"force": ns.force, "isolate": ns.isolate, "fail_fast": ns.fail_fast}
    if ns.dry_run:
        runner = MatrixRunner(matrix, **runner_args)
        print(f"matrix: {len(matrix.methods)} methods x {len(matrix.protocols)} protocols on "
              f"{', '.join(str(d) for d in matrix.datasets)} -> {matrix.out}")
        for entry in runner.selected():
            print(f"- {entry.name}: {runner.status(entry)}")
            for cmd in runner.commands(entry):
                print(f"    {cmd}")
        for protocol, why in matrix.cannot_score.items():
            print(f"- {protocol} cannot score " + "; ".join(f"{d} ({w})" for d, w in why.items()))
        return 0
    outcomes, md = run_matrix(matrix, **runner_args)
    print(f"matrix: {md} and {matrix.out / 'matrix.json'}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _cmd_report(ns: argparse.Namespace) -> int:
    from ovseg.bench.metafile import load_metafiles
    from ovseg.bench.report import build_report, write_report

    roots = ns.results
    if roots is None:  # the default folder: absent simply means nothing has been run here yet
        roots = [r for r in ["outputs/bench"] if Path(r).exists()]
        if not roots:
            print("no outputs/bench here: every row is reported as not reproduced")
    report = build_report(load_metafiles(ns.metafiles), roots, parity_dir=ns.out)
    md, csv_path = write_report(report, ns.out)
    measured = sum(r.results is not None for r in report.rows)
    print(f"{md}: {len(report.rows)} paper evaluations, {measured} with ovseg results, {len(report.notes)} notes")
    print(f"{csv_path}")
    return 0


def _cmd_validate(ns: argparse.Namespace) -> int:
    from ovseg.bench.metafile import default_metafile_dir, load_metafiles
    from ovseg.bench.citations import check_metafile_sources
    from ovseg.bench.suite import load_suite

    meta_dir = Path(ns.metafiles) if ns.metafiles else default_metafile_dir()
    metas = load_metafiles(meta_dir)
    n_values = sum(1 for m in metas.values() for e in m.evaluations for _ in e.values())
    print(f"{meta_dir}: {len(metas)} metafiles, {n_values} paper numbers — schema ok")
    problems = []
    for m in metas.values():
        problems += check_metafile_sources(m, ns.sources)
    verdict = "every number matches" if not problems else f"{len(problems)} problems"
    print(f"cited tables under {ns.sources or meta_dir.parent}: {verdict}")
    suites_dir = Path(ns.suites) if ns.suites else meta_dir.parent / "suites"
    for path in sorted(suites_dir.glob("*.yaml")) if suites_dir.is_dir() else []:
        suite = load_suite(path, metafiles=metas)
        blocked = [e for e in suite.entries if e.not_runnable]
        print(f"{path}: {len(suite.entries)} entries ({len(blocked)} not runnable yet)")
        for e in blocked if ns.verbose else []:
            print(f"    {e.name}: {e.not_runnable}")
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0


def register(commands) -> None:
    bench = commands.add_parser("bench", help="leaderboard: run evaluation suites, build RESULTS.md").add_subparsers(
        dest="bench_command", required=True)

    run = bench.add_parser("run", help="run every evaluation of a suite (resumes: finished work is skipped)")
    run.add_argument("suite", help="a suite name (benchmarks/suites/NAME.yaml) or a suite file")
    run.add_argument("--data-root", default=None, help="sets the suite variable data_root")
    run.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a suite variable")
    run.add_argument("--out", default=None, help="results folder (default: the suite's output)")
    run.add_argument("--only", action="append", default=[], metavar="PATTERN", help="entries to run (glob)")
    run.add_argument("--force", action="store_true", help="rerun even finished entries and datasets")
    run.add_argument("--isolate", action="store_true", help="one subprocess per `ovseg test` (DDP entries always)")
    run.add_argument("--fail-fast", action="store_true", help="stop at the first failure")
    run.add_argument("--dry-run", action="store_true", help="show each entry's state and commands, run nothing")
    run.add_argument("--report", default=None, metavar="DIR", help="afterwards write RESULTS.md/results.csv into DIR")
    run.add_argument("--metafiles", default=None, help="metafile folder (default: benchmarks/metafiles)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a setting added to every `ovseg test` run, e.g. --set trainer.devices=2")
    run.add_argument("--config", action="append", default=[], metavar="YAML",
                     help="a config file added to every run (after the entry's), e.g. configs/logger/wandb.yaml")
    run.set_defaults(func=_cmd_run)

    report = bench.add_parser("report", help="build RESULTS.md and results.csv from results files + metafiles")
    report.add_argument("--results", action="append", default=None, metavar="DIR",
                        help="results folder or file (repeatable; default outputs/bench)")
    report.add_argument("--out", default="benchmarks", help="where RESULTS.md and results.csv go")
    report.add_argument("--metafiles", default=None, help="metafile folder (default: benchmarks/metafiles)")
    report.set_defaults(func=_cmd_report)

    matrix = bench.add_parser("matrix", help="every method under every protocol on the same datasets (resumes: "
                                             "finished cells are skipped); one mIoU table per dataset")
    matrix.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                        help="config files (configs/eval/x.yaml) or metafile evaluations (sclip_vitb16/sclip)")
    matrix.add_argument("--protocols", nargs="+", default=[], metavar="PROTOCOL",
                        help="protocol names or YAML files (each method's own protocol is always a column)")
    matrix.add_argument("--data-root", default=None, help="the data root of every cell")
    matrix.add_argument("--datasets", nargs="+", default=None,
                        help="datasets of every cell (default: those every method's config scores)")
    matrix.add_argument("--out", default="outputs/bench/matrix", help="results folder: <method>/<protocol>/ per cell")
    matrix.add_argument("--force", action="store_true", help="rerun even finished cells")
    matrix.add_argument("--own-names", action="store_true",
                        help="a protocol with no class-name list for a dataset scores it with the dataset's own names "
                             "(marked † in the table) instead of n/a")
    matrix.add_argument("--isolate", action="store_true", help="one subprocess per `ovseg test` (DDP cells always)")
    matrix.add_argument("--fail-fast", action="store_true", help="stop at the first failure")
    matrix.add_argument("--dry-run", action="store_true", help="show each cell's state and commands, run nothing")
    matrix.add_argument("--metafiles", default=None, help="metafile folder (default: benchmarks/metafiles)")
    matrix.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting added to every cell, e.g. --set trainer.devices=2")
    matrix.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="a config file added to every cell (after the method's)")
    matrix.set_defaults(func=_cmd_matrix)

    validate = bench.add_parser("validate", help="check metafiles and suites (and the numbers against sources)")
    validate.add_argument("--metafiles", default=None)
    validate.add_argument("--suites", default=None)
    validate.add_argument("--sources", default=None, metavar="DIR",
                          help="resolve the metafiles' cited documents under DIR (default: the folder above the "
                               "metafiles, whose sources/ holds the cited tables)")
    validate.add_argument("--verbose", "-v", action="store_true")
    validate.set_defaults(func=_cmd_validate)
