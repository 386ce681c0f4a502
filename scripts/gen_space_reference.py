"""Write docs/space-reference.md, the space file's every field, from the schema itself.

The pydantic models in ``evomerge/space_config/`` are the reference: each field's type and
default come from its annotation, its meaning from its docstring (pydantic's
``use_attribute_docstrings``), each section's introduction from its class docstring. A field
added without a docstring fails this script, and ``tests/test_space_reference.py`` fails when the
committed page differs from what this script writes now, so the page cannot drift.

Usage: python scripts/gen_space_reference.py [--check]
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "space-reference.md"

HEADER = """\
# The space file, field by field

Generated from the schema (`evomerge/space_config/`) by `python scripts/gen_space_reference.py`;
do not edit by hand (`tests/test_space_reference.py` checks that this page is what the script
writes now). A worked, commented example: `search_spaces/toy_ties.yaml`, shown in the README.

How to read it: a *section* is a mapping of the fields listed under its own heading; *list of*
is a YAML list; `—` as a default means unset (the field's meaning says what unset does);
`required` fields have no default, and `derived` ones are filled in from others when absent. A
path like `merge.parameters.<name>` stands for any key there. Every field is checked before a run
starts (`evomerge validate space.yaml` runs the same checks, and scores the base model once); an
unknown field is an error, with close matches.
"""

_WORDS = {str: "text", int: "integer", float: "number", bool: "true/false", Any: "any value"}


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """Each section's path and model, in the order a space file is written."""
    from evomerge import space_config as sc

    return [
        ("(top level)", sc.SpaceConfig),
        ("models", sc.Models),
        ("models.donors[]", sc.Donor),
        ("merge", sc.MergeSection),
        ("merge.parameters.<name>", sc.ParamSpec),
        ("objectives[]", sc.Objective),
        ("constraints[]", sc.Constraint),
        ("evaluation", sc.Evaluation),
        ("evaluation.tasks.<task>", sc.TaskEvaluation),
        ("evaluation.rungs", sc.Rungs),
        ("search", sc.Search),
        ("workers", sc.Workers),
        ("route", sc.RouteSection),
        ("route.scale", sc.ScaleSpec),
    ]


def type_name(annotation: Any, paths: dict[type, str]) -> str:
    """An annotation in words: ``tuple[str, ...] | None`` -> ``list of text``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a, paths) for a in args if a is not type(None))
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0], paths)}"
        return "[" + ", ".join(type_name(a, paths) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_name(args[0], paths)} to {type_name(args[1], paths)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"section (`{paths[annotation]}`)" if annotation in paths else "section"
    if annotation in _WORDS:
        return _WORDS[annotation]
    raise SystemExit(f"gen_space_reference: no words for the type {annotation!r}; add them to _WORDS")


def default_text(field: Any) -> str:
    if field.is_required():
        # a required field that the loader fills in when absent says how in its docstring
        return "derived" if "default: " in (field.description or "") else "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "—"
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _markdown(text: str) -> str:
    """A docstring as one Markdown paragraph: rST's ``code`` as `code`, no table-breaking pipes."""
    text = re.sub(r":\w+:`", "`", " ".join(inspect.cleandoc(text).split()))  # :meth:`x` -> `x`
    return text.replace("``", "`").replace("|", "\\|")


def render() -> str:
    sections = _sections()
    paths = {model: path for path, model in sections}
    out = [HEADER]
    for path, model in sections:
        out.append(f"## `{path}`\n" if path != "(top level)" else "## Top level\n")
        out.append(_markdown(model.__doc__ or "") + "\n")
        out.append("| field | type | default | meaning |")
        out.append("| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            if not field.description:
                raise SystemExit(f"gen_space_reference: {model.__name__}.{name} has no docstring; write one under it "
                                 f"in {model.__module__.replace('.', '/')}.py")
            out.append(f"| `{name}` | {type_name(field.annotation, paths)} | {default_text(field)} | "
                       f"{_markdown(field.description)} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            raise SystemExit(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/gen_space_reference.py")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
