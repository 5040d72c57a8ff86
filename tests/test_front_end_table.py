"""docs/recipes.md's "choosing a front end" table is what docs/gen_front_end_table.py prints, for every recipe."""

from __future__ import annotations

import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest

import hrperc
from hrperc import recipes

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "gen_front_end_table.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_front_end_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_committed_table_is_the_generated_one(gen):
    committed = gen.committed((ROOT / "docs" / "recipes.md").read_text())
    assert committed, f"docs/recipes.md lost the markers of the generated table; run {SCRIPT.name} --write"
    generated = gen.table()
    assert committed == generated, (
        f"docs/recipes.md's front-end table is out of date: run .venv/bin/python docs/{SCRIPT.name} --write"
    )


def test_the_table_has_every_built_in_recipe_and_the_settings_asked_for(gen):
    built_in = {m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_")}
    rows = [(row.recipe, row.options) for row in gen.ROWS]
    assert {name for name, _ in rows} == built_in
    assert built_in <= set(hrperc.list_recipes())
    # Pixtral-12B and Mistral 3; Gemma 3 with pan and scan off (the default) and on
    assert ("pixtral", {}) in rows and ("pixtral", {"merge_size": 2}) in rows
    assert ("gemma3", {}) in rows and ("gemma3", {"do_pan_and_scan": True}) in rows


def test_write_replaces_only_the_table(gen, tmp_path, monkeypatch):
    doc = tmp_path / "recipes.md"
    doc.write_text(f"before\n\n{gen.BEGIN}\n| stale |\n{gen.END}\n\nafter\n")
    monkeypatch.setattr(gen, "RECIPES_MD", doc)
    assert gen.main(["--write"]) == 0
    assert doc.read_text() == f"before\n\n{gen.table()}\nafter\n"
