"""``ovseg toyworld generate | pretrain | zeroshot | leaderboard | matrix | clips4-study``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _generate(ns: argparse.Namespace) -> int:
    from ovseg.toyworld.generate import generate

    start = time.perf_counter()
    summary = generate(ns.root, ns.num_train, ns.num_val, ns.seed, ns.size, masks=not ns.no_masks,
                       log=print if ns.progress else None)
    seconds = time.perf_counter() - start
    print(f"toyworld: wrote {summary['num_train']} train + {summary['num_val']} val images "
          f"({ns.size}x{ns.size}, seed {ns.seed}, {len(summary['classes'])} classes) under {ns.root} "
          f"in {seconds:.1f} s")
    return 0


def _pretrain(ns: argparse.Namespace) -> int:
    from ovseg.toyworld.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(model=ns.model, steps=ns.steps, batch_size=ns.batch_size, lr=ns.lr,
                         weight_decay=ns.weight_decay, warmup=ns.warmup, seed=ns.seed, threads=ns.threads,
                         limit=ns.limit, compact=not ns.full_precision, log_every=ns.log_every)
    pretrain(ns.root, ns.out, cfg)
    if ns.eval:
        from ovseg.models.clip import CLIPConfig
        from ovseg.toyworld.zeroshot import evaluate_recognition

        print(evaluate_recognition(ns.root, "val", CLIPConfig(name=ns.model, pretrained=ns.out)).line())
    return 0


def _zeroshot(ns: argparse.Namespace) -> int:
    import torch

    from ovseg.models.clip import CLIPConfig
    from ovseg.toyworld.zeroshot import evaluate_recognition

    torch.set_num_threads(ns.threads)
    result = evaluate_recognition(ns.root, ns.split, CLIPConfig(name=ns.model, pretrained=ns.weights),
                                  prompts=ns.prompt or None, limit=ns.limit)
    print(result.line())
    if ns.per_class:
        print("  per-class AP: " + ", ".join(f"{k} {v:.1f}" for k, v in result.per_class_AP.items()))
    if ns.json:
        from dataclasses import asdict

        from ovseg.utils.io import atomic_write_json

        atomic_write_json(ns.json, asdict(result))
        print(f"wrote {ns.json}")
    return 0


def _leaderboard(ns: argparse.Namespace) -> int:
    from ovseg.toyworld.leaderboard import (LeaderboardSettings, check_against_readme, format_leaderboard,
                                            run_leaderboard)
    from ovseg.utils.project import project_path

    settings = LeaderboardSettings(root=ns.root, out=ns.out, pixelclip_steps=ns.pixelclip_steps,
                                   clips4_steps=ns.clips4_steps,
                                   maskclip_plus_steps=ns.maskclip_plus_steps, folds=ns.folds,
                                   fold_steps=ns.fold_steps,
                                   seed=ns.seed, gallery=ns.gallery, reuse=ns.reuse, extra=ns.extra)
    start = time.perf_counter()
    table = run_leaderboard(settings)
    print("\n" + format_leaderboard(table))
    print(f"leaderboard: {ns.out}/leaderboard.md ({time.perf_counter() - start:.0f} s)")
    readme, readme_run = project_path("README.md"), LeaderboardSettings()  # the README's numbers: the defaults
    if readme.is_file() and all(getattr(settings, k) == getattr(readme_run, k)
                                for k in ("pixelclip_steps", "clips4_steps", "fold_steps", "seed")):
        print(f"against the README's numbers ({readme}, seed 0):")
        print("\n".join(check_against_readme(table, readme)))
    return 0


def _matrix(ns: argparse.Namespace) -> int:
    import shlex

    from ovseg.toyworld.matrix import readme_section, run_toy_matrix, write_readme
    from ovseg.utils.project import project_path

    record, seconds = run_toy_matrix(ns.root, ns.out, methods=ns.methods or None, protocols=ns.protocols or None,
                                     force=ns.force, extra=ns.extra)
    print(f"toyworld matrix: {ns.out}/MATRIX.md ({seconds:.0f} s)")
    if ns.readme is not None:
        readme = Path(ns.readme) if ns.readme else project_path("ovseg/toyworld/README.md")
        args = ["--root", ns.root] + (["--methods", *ns.methods] if ns.methods else []) + (
            ["--protocols", *ns.protocols] if ns.protocols else [])
        write_readme(readme, readme_section(record, seconds, "ovseg toyworld matrix " + shlex.join(args)))
        print(f"toyworld matrix: tables written into {readme}")
    return 0


def _clips4_study(ns: argparse.Namespace) -> int:
    from ovseg.toyworld.clips4_study import main

    return main(ns)


def register(commands) -> None:
    toy = commands.add_parser("toyworld", help="the toy world: generate it, pretrain a toy CLIP, zero-shot check")
    sub = toy.add_subparsers(dest="toyworld_command", required=True)

    gen = sub.add_parser("generate", help="write a procedurally generated dataset (VOC layout, SA-1B masks, captions)")
    gen.add_argument("--root", required=True, help="output folder (its own data root)")
    gen.add_argument("--num-train", type=int, default=4000)
    gen.add_argument("--num-val", type=int, default=300)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=96, help="image side in pixels")
    gen.add_argument("--no-masks", action="store_true", help="skip the SA-1B-format instance masks")
    gen.add_argument("--progress", action="store_true")
    gen.set_defaults(func=_generate)

    pre = sub.add_parser("pretrain", help="train the toy CLIP contrastively on (image, caption) pairs (CPU)")
    pre.add_argument("--root", required=True, help="a root written by `ovseg toyworld generate`")
    pre.add_argument("--out", required=True, help="weights file to write (.safetensors or .pt)")
    pre.add_argument("--model", default="toyworld-vit", help="open_clip model config name")
    pre.add_argument("--steps", type=int, default=600)
    pre.add_argument("--batch-size", type=int, default=128)
    pre.add_argument("--lr", type=float, default=1e-3)
    pre.add_argument("--weight-decay", type=float, default=0.1)
    pre.add_argument("--warmup", type=int, default=50)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; shipped: 1)")
    pre.add_argument("--limit", type=int, default=None, help="use the first N train images only")
    pre.add_argument("--full-precision", action="store_true",
                     help="write the fp32 state dict as trained (default: fp16, unused token rows zeroed)")
    pre.add_argument("--log-every", type=int, default=50)
    pre.add_argument("--eval", action="store_true", help="report zero-shot recognition on val afterwards")
    pre.set_defaults(func=_pretrain)

    zs = sub.add_parser("zeroshot", help="image-level zero-shot recognition of the toy classes (mAP vs chance)")
    zs.add_argument("--root", required=True)
    zs.add_argument("--split", default="val")
    zs.add_argument("--model", default="toyworld-vit")
    zs.add_argument("--weights", default="toyworld", help="pretrained tag or weights file (default: shipped)")
    zs.add_argument("--prompt", action="append", default=[],
                    help="prompt template with {} (repeat to ensemble; default 'a photo of a {}.')")
    zs.add_argument("--limit", type=int, default=None)
    zs.add_argument("--threads", type=int, default=1)
    zs.add_argument("--per-class", action="store_true")
    zs.add_argument("--json", default=None, help="also write the result as JSON")
    zs.set_defaults(func=_zeroshot)

    from ovseg.toyworld.leaderboard import LeaderboardSettings

    default = LeaderboardSettings()
    lb = sub.add_parser("leaderboard", help="every method on toy val: zero-shot CLIP/MaskCLIP, PixelCLIP and CLIP-S4 "
                                            "frozen -> fine-tuned (gain), MaskCLIP+ teacher -> trained student, "
                                            "optional toy 4-fold protocol")
    lb.add_argument("--root", default=default.root, help="a root written by `ovseg toyworld generate`")
    lb.add_argument("--out", default=default.out)
    lb.add_argument("--pixelclip-steps", type=int, default=default.pixelclip_steps)
    lb.add_argument("--clips4-steps", type=int, default=default.clips4_steps)
    lb.add_argument("--maskclip-plus-steps", type=int, default=default.maskclip_plus_steps)
    lb.add_argument("--folds", action="store_true", help="also CLIP-S4's toy 4-fold unknown-class protocol")
    lb.add_argument("--fold-steps", type=int, default=default.fold_steps)
    lb.add_argument("--seed", type=int, default=default.seed)
    lb.add_argument("--gallery", type=int, default=default.gallery, help="val images in predictions.png")
    lb.add_argument("--reuse", action="store_true", help="keep stages whose results/checkpoint exist (resume)")
    lb.add_argument("extra", nargs="*", help="more `ovseg fit/test` arguments for every stage (after --)")
    lb.set_defaults(func=_leaderboard)

    mx = sub.add_parser("matrix", help="every training-free toy config under every shipped protocol on toy val "
                                       "(resumes: finished cells are skipped); one mIoU table")
    mx.add_argument("--root", default=default.root, help="a root written by `ovseg toyworld generate`")
    mx.add_argument("--out", default="outputs/toyworld_matrix")
    mx.add_argument("--methods", nargs="+", default=[], metavar="CONFIG",
                    help="configs (default: every training-free configs/toyworld/*.yaml)")
    mx.add_argument("--protocols", nargs="+", default=[], metavar="PROTOCOL",
                    help="protocol names or YAML files (default: every shipped protocol)")
    mx.add_argument("--force", action="store_true", help="rerun even finished cells")
    mx.add_argument("--readme", nargs="?", const="", default=None, metavar="FILE",
                    help="write the tables between the generated markers of FILE (default: ovseg/toyworld/README.md)")
    mx.add_argument("extra", nargs="*", help="more `ovseg test` arguments for every cell (after --)")
    mx.set_defaults(func=_matrix)

    st = sub.add_parser("clips4-study", help="CLIP-S4 training variants over seeds: fine-tuned mIoU, 4-fold known / "
                                             "unknown mIoU, where the unknown prototypes go")
    st.add_argument("--root", default=default.root)
    st.add_argument("--out", default="outputs/clips4_study")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    st.add_argument("--steps", type=int, default=default.clips4_steps, help="fine-tuning and per-fold steps")
    st.add_argument("--variant", action="append", required=True,
                    help="'name: --model.init_args.X value ...' (repeatable; 'name:' = the config's defaults)")
    st.add_argument("--no-folds", action="store_true", help="fine-tuned mIoU only")
    st.add_argument("--no-tune", action="store_true", help="the 4-fold protocol only (no full-vocabulary fine-tune)")
    st.add_argument("--diagnostic-images", type=int, default=200,
                    help="labelled train images behind each fold's unknown-prototype shares")
    st.add_argument("--reuse", action="store_true", help="keep stages whose results/checkpoint exist (resume)")
    st.add_argument("extra", nargs="*", help="more `ovseg fit/test` arguments for every stage (after --)")
    st.set_defaults(func=_clips4_study)
