"""``ovseg fit|test --help`` explains every option of every method, the DataModule and its training sources:
jsonargparse shows a parameter's help only from an ``Args:`` docstring section."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

import ovseg.methods
from ovseg.data.datamodule import OVSegDataModule
from ovseg.data.sources import TrainSource


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


CONFIGURABLE = [*(getattr(ovseg.methods, name) for name in ovseg.methods.__all__), OVSegDataModule,
                *_subclasses(TrainSource)]


def options_without_help(cls: type) -> list[str]:
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x")
    options = [a for a in parser._actions if a.dest.startswith("x.") and not a.dest.endswith("__path__")]
    assert options, f"{cls.__name__} shows no options"
    return [a.dest[2:] for a in options if not a.help]


@pytest.mark.parametrize("cls", CONFIGURABLE, ids=lambda c: c.__name__)
def test_every_option_has_help(cls):
    assert options_without_help(cls) == []


def test_the_methods_and_sources_are_all_checked():
    names = {c.__name__ for c in CONFIGURABLE}
    assert {"OVSegMethod", "NACLIP", "PixelCLIP", "KNNProbe", "LinearProbe", "OVSegDataModule", "SpecImages",
            "ImageFolder", "SA1B", "CLIPS4", "TwoViewImages"} <= names
