"""docs/space-reference.md is what scripts/gen_space_reference.py writes from the schema now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from evomerge.space_config.messages import _model_in

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gen_space_reference", ROOT / "scripts" / "gen_space_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_what_the_schema_generates():
    text = _script().render()
    committed = (ROOT / "docs" / "space-reference.md").read_text(encoding="utf-8")
    assert committed == text, "docs/space-reference.md is stale: run python scripts/gen_space_reference.py"


def test_every_field_of_every_section_is_listed_with_its_meaning():
    script = _script()
    text = script.render()
    for path, model in script._sections():
        heading = "## Top level" if path == "(top level)" else f"## `{path}`"
        section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        assert [r.split("`")[1] for r in rows] == list(model.model_fields)
        assert all(r.rstrip(" |").split(" | ")[-1] for r in rows)  # a meaning in every row
    # every section model of the schema has a heading (a new section cannot be left out)
    reached = {m for _, m in script._sections()}
    for model in reached:
        for field in model.model_fields.values():
            inner = _model_in(field.annotation)
            assert inner is None or inner in reached, f"{inner.__name__} has no section in the reference"
    assert "| `include_path` | list of text | `[]` |" in text
