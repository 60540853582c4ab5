"""The ``ovseg demo`` page (Gradio): inputs on the left, one panel per method on the right (what runs — method,
weights, protocol —, the overlay with its legend, the colour label map, each class's share of the pixels, the label
map as a PNG whose pixel values are class indices). Everything it computes comes from :mod:`ovseg.demo.engine`."""

from __future__ import annotations

import html
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from ovseg.demo.engine import DemoEngine, DemoError, MethodResult, ProtocolChoice
from ovseg.eval.visualize import blend, colourise

OWN_PROTOCOL = "each method's own"
PROTOCOL_MODE = "the protocol's"
#: shipped vocabularies offered in the page (``ovseg/data/classnames/<name>.txt``)
VOCABULARIES = ("toyworld", "voc21", "voc20", "context59", "context60", "coco_object", "coco_stuff171", "ade150",
                "cityscapes")


def vocabulary_text(name: str) -> str:
    """A shipped vocabulary as the page's words: ``sky,grass;lawn,…``. Only names of :data:`VOCABULARIES`."""
    from ovseg.data.classnames import read_class_names

    if name not in VOCABULARIES:
        raise DemoError(f"unknown vocabulary {name!r}")
    return ", ".join(";".join(synonyms) for synonyms in read_class_names(name))


def legend_html(index: int, result: MethodResult) -> str:
    """The classes present, largest share first: a colour swatch, the name, the share of the pixels."""
    rows = "".join(
        f'<tr class="ovseg-class" data-class="{html.escape(name)}" data-share="{share:.6f}">'
        f'<td><span style="display:inline-block;width:14px;height:14px;background:{result.colour(name)}"></span></td>'
        f'<td>{html.escape(name)}</td><td style="text-align:right">{100 * share:.1f} %</td></tr>'
        for name, share in result.shares.items())
    return f'<table id="ovseg-legend-{index}" class="ovseg-legend"><tr><th></th><th>class</th><th>pixels</th></tr>' \
           f"{rows}</table>"


def shown_path(path: str) -> str:
    """A config path as the page shows it: relative to the working folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def header_markdown(result: MethodResult | None, name: str, weights: str, config: str) -> str:
    config = shown_path(config)
    if weights.startswith("checkpoint:"):
        weights = "checkpoint:" + shown_path(weights.removeprefix("checkpoint:"))
    if result is None:
        return f"### {name}\nweights `{weights}` · config `{config}`"
    reused = " · image features reused" if result.features_reused else ""
    return (f"### {name}\nweights `{weights}` · config `{config}`  \n{result.protocol}  \n"
            f"{result.pred.shape[1]}×{result.pred.shape[0]} px · {result.seconds:.2f} s{reused}")


def display_scale(size: tuple[int, int], at_least: int = 320) -> int:
    """Small images (the toy world's 96 px) are shown enlarged, pixels as blocks; the label PNG keeps their size."""
    return max(1, at_least // max(size))


#: method panels in one row of the page
METHODS_PER_ROW = 3


def _method_panel(gr: Any, index: int, loaded: Any) -> tuple[Any, ...]:
    """One method's column: what runs, the overlay, the label map, the legend with shares, the label PNG."""
    with gr.Column(min_width=200, elem_id=f"ovseg-method-{index}", variant="panel"):
        header = gr.Markdown(header_markdown(None, loaded.name, loaded.weights, loaded.config),
                             elem_id=f"ovseg-header-{index}")
        overlay = gr.Image(label="overlay", interactive=False, elem_id=f"ovseg-overlay-{index}", height=230)
        labels = gr.Image(label="label map", interactive=False, elem_id=f"ovseg-labels-{index}", height=230)
        legend = gr.HTML(elem_id=f"ovseg-legend-box-{index}")
        download = gr.File(label="label map PNG (pixel = class index)", interactive=False,
                           elem_id=f"ovseg-download-{index}")
    return header, overlay, labels, legend, download


def build_app(engine: DemoEngine, classes: str | None = None) -> Any:
    import gradio as gr
    from gradio.utils import get_upload_folder

    from ovseg.eval.protocols import available_protocols

    upload_root = get_upload_folder()
    start_words = ""
    if classes:
        start_words = vocabulary_text(classes) if classes in VOCABULARIES else ", ".join(
            ";".join(s) for s in engine.vocabulary(classes))

    with gr.Blocks(title="ovseg demo") as app:
        gr.Markdown("## ovseg demo: open-vocabulary segmentation\nDrop an image (or pick one), type class names "
                    "(comma-separated, `;` between synonyms of one class) and press **Segment**.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                image = gr.Image(label="image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="ovseg-image", height=240)
                listed = gr.Dropdown(choices=engine.image_ids, value=None, label="or one of the listed images",
                                     elem_id="ovseg-listed", visible=bool(engine.image_ids))
                words = gr.Textbox(value=start_words, label="class names", lines=2, elem_id="ovseg-classes",
                                   placeholder="cat, dog;puppy, sky")
                vocabulary = gr.Dropdown(choices=list(VOCABULARIES), value=None, label="or a dataset's vocabulary",
                                         elem_id="ovseg-vocabulary")
                with gr.Accordion("protocol", open=False):
                    protocol = gr.Dropdown(choices=[OWN_PROTOCOL, *available_protocols()], value=OWN_PROTOCOL,
                                           label="protocol", elem_id="ovseg-protocol")
                    mode = gr.Radio(choices=[PROTOCOL_MODE, "whole", "slide"], value=PROTOCOL_MODE,
                                    label="windows", elem_id="ovseg-mode")
                    with gr.Row():
                        crop = gr.Number(value=224, precision=0, label="crop", minimum=16)
                        stride = gr.Number(value=112, precision=0, label="stride", minimum=8)
                    short_side = gr.Number(value=0, precision=0, label="resize short side to (0: protocol's)",
                                           minimum=0)
                run = gr.Button("Segment", variant="primary", elem_id="ovseg-run")
                status = gr.Markdown(elem_id="ovseg-status")
            with gr.Column(scale=4):
                panels = []
                for first in range(0, len(engine.methods), METHODS_PER_ROW):  # methods side by side, a few a row
                    with gr.Row(equal_height=False):
                        for index in range(first, min(first + METHODS_PER_ROW, len(engine.methods))):
                            panels.append(_method_panel(gr, index, engine.methods[index]))
                        for _ in range(first + METHODS_PER_ROW - len(engine.methods)):
                            gr.Column(min_width=200)  # keeps the last row's panels as wide as the others

        outputs = [status] + [c for panel in panels for c in panel]

        def segment(image_path, listed_id, text, protocol_name, mode_name, crop_px, stride_px, short_px):
            try:
                if image_path:
                    pixels = engine.uploaded_image(image_path, upload_root)
                elif listed_id:
                    pixels = engine.listed_image(listed_id)
                else:
                    raise DemoError("no image: upload one or pick a listed one")
                choice = ProtocolChoice(
                    protocol=None if protocol_name in (None, OWN_PROTOCOL) else protocol_name,
                    mode=None if mode_name in (None, PROTOCOL_MODE) else mode_name,
                    crop=int(crop_px or 0) or None, stride=int(stride_px or 0) or None,
                    short_side=int(short_px or 0) or None)
                results = engine.run(pixels, text, choice)
            except DemoError as err:
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                return [f'<span id="ovseg-error">error: {html.escape(message)}</span>'] + [
                    gr.update() if k == 0 else None
                    for _ in engine.methods for k in range(5)]
            values: list[Any] = [f"query {engine.queries} · {len(results)} method(s) · "
                                 f"{len(results[0].class_names)} classes"]
            scale = display_scale(pixels.shape[:2])
            for index, (loaded, result) in enumerate(zip(engine.methods, results)):
                big = result.pred.repeat(scale, 0).repeat(scale, 1)
                values += [header_markdown(result, loaded.name, loaded.weights, loaded.config),
                           blend(pixels.repeat(scale, 0).repeat(scale, 1), big), colourise(big),
                           legend_html(index, result), str(result.label_png)]
            return values

        run.click(segment, [image, listed, words, protocol, mode, crop, stride, short_side], outputs,
                  concurrency_limit=1)
        vocabulary.change(lambda name: vocabulary_text(name) if name else gr.update(), vocabulary, words)
        listed.change(lambda value: None if value else gr.update(), listed, image)
    return app


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(engine: DemoEngine, host: str = "127.0.0.1", port: int = 7860, classes: str | None = None,
          print_url: bool = False) -> None:
    """Serve the page until interrupted. Offline: no telemetry, no web fonts, no share link."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # uploads land in a folder of this run only; the engine reads nothing outside it
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="ovseg-demo-uploads-"))
    import gradio as gr

    app = build_app(engine, classes)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port or free_port(host), max_file_size=engine.max_upload_bytes,
               share=False, prevent_thread_lock=True, quiet=True, ssr_mode=False, theme=theme,
               footer_links=[])
    if print_url:
        print(f"ovseg demo: {app.local_url}", flush=True)
    else:
        print(f"ovseg demo: serving on {app.local_url} (Ctrl+C stops it)", file=sys.stderr, flush=True)
    app.block_thread()
