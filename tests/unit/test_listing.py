"""``ovseg list attentions|protocols|methods|datasets`` shows every name a config can use, one line each."""

import pytest

import ovseg.methods
from ovseg.cli import main
from ovseg.data.specs import SPECS
from ovseg.eval.protocols import available_protocols
from ovseg.models.attention import LAST_BLOCK_ATTENTIONS, register_attention


def listed(kind: str, capsys) -> dict[str, str]:
    assert main(["list", kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {name: rest.strip() for name, _, rest in (line.partition(" ") for line in lines)}


def test_attentions_include_one_registered_at_run_time(capsys, monkeypatch):
    monkeypatch.setitem(LAST_BLOCK_ATTENTIONS, "mine", None)

    @register_attention("mine")
    def mine(tokens):
        """My attention: the values as they are."""
        return tokens.v

    shown = listed("attentions", capsys)
    assert list(shown) == sorted(LAST_BLOCK_ATTENTIONS) and "mine" in shown
    assert shown["mine"] == "My attention: the values as they are."


@pytest.mark.parametrize("kind, names", [
    ("protocols", available_protocols()),
    ("datasets", list(SPECS)),
    ("methods", [n for n in ovseg.methods.__all__ if n != "OVSegMethod"]),
])
def test_every_registered_name_is_listed_with_a_description(kind, names, capsys):
    shown = listed(kind, capsys)
    assert list(shown) == names and all(shown.values())


def test_an_unknown_kind_names_the_kinds(capsys):
    with pytest.raises(SystemExit):
        main(["list", "metods"])
    assert "choose from 'attentions', 'datasets', 'methods', 'protocols'" in capsys.readouterr().err
