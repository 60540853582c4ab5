"""``ovseg list attentions|protocols|methods|datasets``: what a config can name, with one line on each.

    ovseg list attentions     # clip.last_block values (ovseg.models.attention)
    ovseg list protocols      # model.init_args.protocol values (ovseg/eval/protocols/*.yaml)
    ovseg list methods        # model.class_path values (ovseg.methods)
    ovseg list datasets       # data.init_args.datasets values (ovseg.data.specs)
"""

from __future__ import annotations

import argparse
import inspect


def _first_line(text: str | None) -> str:
    return (inspect.cleandoc(text or "").split("\n\n")[0]).replace("\n", " ")


def attentions() -> dict[str, str]:
    from ovseg.models.attention import LAST_BLOCK_ATTENTIONS

    return {name: _first_line(fn.__doc__) for name, fn in sorted(LAST_BLOCK_ATTENTIONS.items())}


def protocols() -> dict[str, str]:
    from ovseg.eval.protocols import available_protocols, load_protocol

    return {name: load_protocol(name).description for name in available_protocols()}


def methods() -> dict[str, str]:
    import ovseg.methods
    from ovseg.methods.base import OVSegMethod

    classes = (getattr(ovseg.methods, name) for name in ovseg.methods.__all__)
    return {cls.__name__: _first_line(cls.__doc__) for cls in classes
            if issubclass(cls, OVSegMethod) and cls is not OVSegMethod}


def datasets() -> dict[str, str]:
    from ovseg.data.specs import SPECS

    return {name: spec.description for name, spec in SPECS.items()}


#: ``ovseg list KIND``: KIND -> its registry as ``{name: one line}``
REGISTRIES = {"attentions": attentions, "protocols": protocols, "methods": methods, "datasets": datasets}


def _cmd_list(ns: argparse.Namespace) -> int:
    entries = REGISTRIES[ns.kind]()
    width = max(map(len, entries)) + 2
    for name, text in entries.items():
        print(f"{name:<{width}}{text}".rstrip())
    return 0


def register(commands) -> None:
    parser = commands.add_parser("list", help="what configs can name: attentions, protocols, methods, datasets")
    parser.add_argument("kind", choices=sorted(REGISTRIES), help="which registry to show")
    parser.set_defaults(func=_cmd_list)
