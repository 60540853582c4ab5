"""``ovseg demo``: a local web page (Gradio) where a person drops an image, types class names and sees each method's
segmentation side by side.

    ovseg demo --config configs/eval/maskclip_vitb16.yaml --config configs/eval/naclip_vitb16.yaml
    ovseg demo --config configs/toyworld/maskclip.yaml --config configs/toyworld/clips4.yaml --ckpt_path last.ckpt \
        --images data/toyworld/demo_images --classes toyworld

Each ``--config`` starts a method; a ``--ckpt_path`` after it belongs to it. The page is served on 127.0.0.1 unless
``--host`` says otherwise. Gradio is an extra: ``pip install 'ovseg[demo]'``; this module imports neither it nor
torch until the command runs.
"""

from __future__ import annotations

import argparse
import importlib.util

#: what to install when Gradio is missing
INSTALL_HINT = "pip install 'ovseg[demo]'  (or: make demo-ui)"


class _MethodArgument(argparse.Action):
    """``--config FILE`` starts a method, ``--ckpt_path CKPT`` sets the checkpoint of the last one started."""

    def __call__(self, parser, namespace, value, option_string=None):
        methods = list(getattr(namespace, "methods", None) or [])
        if option_string == "--config":
            methods.append({"config": value, "ckpt_path": None})
        else:
            if not methods:
                parser.error("--ckpt_path belongs to a method: give its --config first")
            if methods[-1]["ckpt_path"]:
                parser.error(f"--ckpt_path given twice for {methods[-1]['config']}")
            methods[-1] = {**methods[-1], "ckpt_path": value}
        namespace.methods = methods


def register(commands) -> None:
    parser = commands.add_parser(
        "demo", help="a local web page: any image, any words, methods side by side (needs ovseg[demo])",
        description="A local web page (Gradio): drop an image or pick one of --images, type class names "
                    "('cat,dog;puppy,sky'), see each method's overlay, label map and class shares side by side.")
    parser.add_argument("--config", action=_MethodArgument, dest="methods", metavar="FILE", required=True,
                        help="a method's config, as `ovseg predict --config` takes it (repeat for more methods)")
    parser.add_argument("--ckpt_path", action=_MethodArgument, dest="methods", metavar="CKPT",
                        help="the checkpoint of the method whose --config comes before it")
    parser.add_argument("--images", metavar="DIR", help="a folder (or file) of images the page offers to pick")
    parser.add_argument("--classes", default=None,
                        help="the words the page starts with: 'cat,dog;puppy,sky' or a shipped vocabulary name")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: a free one)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the models run (auto: the GPU when there is one)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image upload accepted")
    parser.add_argument("--print-url", action="store_true", help="print 'ovseg demo: http://…' once serving")
    parser.set_defaults(func=_cmd_demo)


def trainer_args(device: str) -> list[str]:
    """The Trainer options every method of the page gets: one device, no logger or progress bar."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1",
            "--trainer.strategy", "auto"]


def _cmd_demo(ns: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        print(f"ovseg demo needs Gradio, which is not installed: {INSTALL_HINT}")
        return 1
    from ovseg.demo.app import serve
    from ovseg.demo.engine import DemoEngine, LoadedMethod

    extra = trainer_args(ns.device)
    methods = [LoadedMethod.load(m["config"], m["ckpt_path"], extra) for m in ns.methods]
    engine = DemoEngine(methods, images=ns.images, max_upload_mb=ns.max_upload_mb)
    serve(engine, host=ns.host, port=ns.port, classes=ns.classes, print_url=ns.print_url)
    return 0
