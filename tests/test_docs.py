"""The generated reference pages of the documentation site: every config key documented and listed,
every command and option listed. (`make test` also builds the site with `mkdocs build --strict`.)"""

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import click
import typer
from pydantic import BaseModel, Field

from iopfl.adapt import METHODS as ADAPT_METHODS
from iopfl.cli import app
from iopfl.config import Config
from iopfl.fl import STRATEGIES
from iopfl.reference import cli_reference, config_keys, config_reference, on_page_markdown, undocumented_keys

ROOT = Path(__file__).resolve().parents[1]


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        if isinstance(value, dict):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_has_a_description():
    assert undocumented_keys() == []


def test_a_key_without_description_is_found():
    class Section(BaseModel):
        documented: int = Field(1, description="says what it does")
        bare: int = 2

    class Root(BaseModel):
        seed: int = Field(0, description="a seed")
        part: Section = Field(default_factory=Section)

    assert undocumented_keys(Root()) == ["part.bare"]
    assert [k.key for k in config_keys(Root())] == ["seed", "part.documented", "part.bare"]


def test_config_reference_lists_every_key_with_its_default():
    page = config_reference()
    for key in _leaf_keys(Config().model_dump(mode="json")):  # fl's method parameters included
        assert f"`{key}`" in page, key
    assert "| `adapt.lambda_anchor` | float, ≥ 0.0 | `100.0` |" in page
    assert "| `fl.mu` | `fedprox` |" in page


def test_cli_reference_lists_every_command_and_option():
    page = cli_reference()
    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="iopfl")
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        assert f"## `iopfl {name}`" in page, name
        for param in command.params:
            spelled = param.opts[0] if isinstance(param, click.Option) else param.make_metavar(ctx)
            assert f"`{spelled}`" in page, (name, spelled)
    assert "| `OUT` | required | Folder to write the dataset into. |" in page  # an argument's help


def test_hook_fills_markers_and_warns_on_unknown(caplog):
    page = SimpleNamespace(file=SimpleNamespace(src_uri="x.md"))
    out = on_page_markdown("# CLI\n\n<!-- generated: cli-reference -->\n", page=page)
    assert "<!-- generated" not in out and "`iopfl train`" in out
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.iopfl"):
        assert on_page_markdown("<!-- generated: nothing -->", page=page) == "<!-- generated: nothing -->"
    assert "unknown generated section 'nothing'" in caplog.text


def _table_methods(text: str) -> set[str]:
    """The backquoted names in the first cell of every table row of ``text``."""
    return {
        name
        for line in text.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z]+)`", line.split("|")[1])
    }


def test_every_method_is_in_the_method_tables():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    guide = (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    assert set(STRATEGIES) - _table_methods(readme) == set()
    assert set(STRATEGIES) - _table_methods(guide) == set()
    outside = readme.split("Outside (`iopfl adapt --method`):")[1].split("\n\n")[0]
    assert set(ADAPT_METHODS) - set(re.findall(r"`([a-z]+)`", outside)) == set()


def test_a_missing_method_is_noticed():
    assert _table_methods("| `a`, `b` | x |\n| c | `d` |\n") == {"a", "b"}
