"""The one YAML reader for user files: safe_load's meaning, except that a key written twice is an error."""

from __future__ import annotations

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.strict_yaml import load, load_all


@pytest.mark.parametrize("text", [
    "a: 1\nb: [1, 2, {c: 3}]\nd: {e: null, f: 2.5}\n",
    "base: &b {weight: 0.5, density: 0.3}\nmodel:\n  <<: *b\n  density: 0.9\n",  # a merge key may be overridden
    "1: one\n'1': text\n",  # an int and a str are two keys, as for safe_load
])
def test_what_safe_load_reads_is_read_the_same(text):
    assert load(text, source="f.yaml") == yaml.safe_load(text)


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("search:\n  budget: 2\n  seed: 0\n  budget: 200\n", "budget", (2, 4)),
    ("a: 1\na: 1\n", "a", (1, 2)),  # equal values too: the second is still a mistake
    ("models:\n  - {model: x, model: y}\n", "model", (2, 2)),
])
def test_a_key_written_twice_is_refused_with_both_lines(text, key, lines):
    with pytest.raises(ConfigError) as err:
        load(text, source="f.yaml")
    assert str(err.value) == (f"f.yaml: key {key!r} appears twice in one mapping, on line {lines[0]} and on "
                              f"line {lines[1]}; keep one")


def test_every_document_of_a_multi_stage_file_is_strict():
    assert load_all("a: 1\n---\na: 2\n", source="m.yaml") == [{"a": 1}, {"a": 2}]  # one key per document is fine
    with pytest.raises(ConfigError, match="m.yaml: key 'b' appears twice in one mapping, on line 3 and on line 4"):
        load_all("a: 1\n---\nb: 1\nb: 2\n", source="m.yaml")


def test_python_tags_stay_refused():
    with pytest.raises(ConfigError, match="f.yaml: not valid YAML"):
        load("!!python/object/apply:os.system ['true']\n", source="f.yaml")
