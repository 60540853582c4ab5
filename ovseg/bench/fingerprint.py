"""What a suite's results depend on, and so what decides whether finished results are reused: the settings that
change a score (:data:`NON_RESULT_KEYS` are the ones that do not), the contents of every file a setting names
(checkpoints, weights, a protocol YAML, class names), the evaluated data files, and ovseg's own code (the hash of
its source tree: a change at the same version is another program). Hashed with :func:`sha`.

The settings hashed are the ones written down, as written: each config file's content (its group fragments
expanded), the overrides, the extra arguments; the values a run gets (defaults included) are LightningCLI's, see
:meth:`ovseg.bench.suite.Run.setting`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from ovseg.eval.session import EvaluationSettings

#: settings (canonical dotted keys, ``init_args`` removed) that never change a number
NON_RESULT_KEYS = (
    "data.root", "data.num_workers", "data.eval_batch_size", "data.datasets",
    "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.devices",
    "trainer.strategy", "trainer.num_nodes", "trainer.default_root_dir", "trainer.callbacks",
    *(f"model.{name}" for name in EvaluationSettings.score_free()),
)


def changes_no_score(key: str) -> bool:
    """``key`` (canonical) is a setting of :data:`NON_RESULT_KEYS` or inside one."""
    return any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def parse_cli_pairs(args: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=1 --c x --flag`` -> ``[("a.b", 1), ("c", "x"), ("flag", True)]`` (values read as YAML)."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"extra argument {arg!r}: expected --key value or --key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        pairs.append((key, parsed))
        i += 1
    return pairs


def sha(obj: Any) -> str:
    """The SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (cached per path, size and mtime in this process); ``missing`` if there is none."""
    path = Path(path).expanduser()
    if not path.is_file():
        return "missing"
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def named_files_fingerprint(settings: dict[str, Any]) -> dict[str, str]:
    """``{key: content hash}`` of the settings (flat, canonical keys) whose value names an existing file: a weights
    file, checkpoint, protocol YAML or class-name file replaced at the same path is another run."""
    out = {}
    for key, value in settings.items():
        folder = _model_folder(value)
        if folder is not None:  # clip.name local-dir:/hf: a folder of weights and configs
            out[key] = sha({p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
                            if p.is_file()})
        elif isinstance(value, str) and value and not changes_no_score(key) and "\n" not in value:
            try:
                found = Path(value).expanduser().is_file()
            except OSError:  # a name too long to be a path
                found = False
            if found or key.split(".")[-1] in ("ckpt_path", "checkpoint"):
                out[key] = file_sha256(value)
    return out


def _model_folder(value: Any) -> Path | None:
    """The folder of a ``local-dir:`` / ``hf:`` model name, if it exists."""
    from ovseg.models.clip_loading import HF_PREFIX, LOCAL_DIR_PREFIX

    if isinstance(value, str):
        for prefix in (LOCAL_DIR_PREFIX, HF_PREFIX):
            if value.startswith(prefix) and Path(value[len(prefix):]).expanduser().is_dir():
                return Path(value[len(prefix):]).expanduser()
    return None


@functools.lru_cache(maxsize=None)
def code_fingerprint(package: Path = Path(__file__).resolve().parents[1]) -> str:
    """The hash of ovseg's source tree as it runs (every file of the ``package`` folder but caches: code,
    protocols, class names, shipped weights), so that results of other code at the same version are not reused."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(package).as_posix()}|{file_sha256(path)}|".encode())
    return digest.hexdigest()


def dataset_fingerprint(dataset: str | dict, root: str, split: str) -> str:
    """:func:`ovseg.data.seg_dataset.split_fingerprint` of a named dataset, :func:`ovseg.data.hf.entry_fingerprint`
    of a dict entry, or ``unreadable`` (a result made from readable files is then not reused; the run itself
    reports the problem)."""
    from ovseg.data.hf import entry_fingerprint
    from ovseg.data.seg_dataset import split_fingerprint
    from ovseg.data.specs import SPECS

    try:
        if isinstance(dataset, dict):
            return entry_fingerprint(dataset, root)
        if dataset not in SPECS:
            return f"unknown dataset {dataset}"
        return split_fingerprint(dataset, root, split)
    except (OSError, ValueError):
        return "unreadable"
