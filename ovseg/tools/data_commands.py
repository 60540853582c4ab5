"""``ovseg data verify | convert | synth``."""

from __future__ import annotations

import argparse

from ovseg.tools.convert import register_all


def _data_verify(ns: argparse.Namespace) -> int:
    from ovseg.data.specs import BENCHMARKS
    from ovseg.data.verify import verify_dataset

    names = ns.datasets.split(",") if ns.datasets else list(BENCHMARKS)
    reports = [verify_dataset(n, ns.root, ns.split, check_labels=not ns.quick, progress=ns.progress) for n in names]
    for r in reports:
        print(r.line())
        for p in r.problems[1:] if ns.verbose else []:
            print(f"    {p}")
    return 0 if all(r.complete for r in reports if r.found) and any(r.found for r in reports) else 1


def _data_synth(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from ovseg.data.synthetic import write_synthetic

    for name in ns.datasets.split(","):
        if name == "sa1b":  # PixelCLIP's training folder: images + SA-1B mask JSONs under ROOT/sa1b
            from ovseg.data.sa1b import write_synthetic_sa1b

            # landscape images, as SA-1B's: height --min-size, width --max-size
            paths = write_synthetic_sa1b(Path(ns.root) / "sa1b", ns.num_images, (ns.min_size, ns.max_size),
                                         seed=ns.seed)
            print(f"sa1b: wrote {len(paths)} images with masks under {Path(ns.root) / 'sa1b'}")
            continue
        ids = write_synthetic(name, ns.root, ns.split, ns.num_images, (ns.min_size, ns.max_size), ns.seed)
        print(f"{name}: wrote {len(ids)} images under {ns.root}")
    return 0


def register(commands) -> None:
    data = commands.add_parser("data", help="dataset layouts: verify, convert, synth").add_subparsers(
        dest="data_command", required=True
    )
    verify = data.add_parser("verify", help="check file counts and label values of each dataset under a root")
    verify.add_argument("--root", required=True)
    verify.add_argument("--datasets", default=None, help="comma-separated names (default: all benchmarks)")
    verify.add_argument("--split", default="val")
    verify.add_argument("--quick", action="store_true", help="count files only, do not read labels")
    verify.add_argument("--progress", action="store_true")
    verify.add_argument("--verbose", "-v", action="store_true")
    verify.set_defaults(func=_data_verify)

    synth = data.add_parser("synth", help="write tiny synthetic datasets in the real on-disk layouts")
    synth.add_argument("--root", required=True)
    synth.add_argument("--datasets", default="voc21",
                       help="comma-separated benchmark names, and/or sa1b (PixelCLIP's image + mask folder)")
    synth.add_argument("--split", default="val")
    synth.add_argument("--num-images", type=int, default=5)
    synth.add_argument("--min-size", type=int, default=48)
    synth.add_argument("--max-size", type=int, default=96)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_data_synth)

    convert = data.add_parser("convert", help="turn official downloads into the mmsegmentation layouts")
    register_all(convert.add_subparsers(dest="converter", required=True))
