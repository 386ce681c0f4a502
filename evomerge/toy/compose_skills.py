"""Deterministic data for the ``compose`` toy world (see :mod:`evomerge.toy.skills` for the pair
world's and the machinery both share).

- ``shift``: each letter one on in the alphabet, ``"sft:abz="`` -> ``"bca"`` (a map per character;
  the base knows the map one back, ``prv``).
- ``rotate``: the first letter moved to the end, ``"rot:abcd="`` -> ``"bcda"`` (a map of positions;
  the base knows it under another instruction, ``lft``, as the pair world's base knows reversal).
- ``swap``: adjacent pairs swapped, ``"swp:abcde="`` -> ``"badce"`` (the base knows it as ``xch``).
- ``rotate_shift``, composed, no specialist of its own: rotate, then shift the result,
  ``"rot>sft:abcd="`` -> ``"cdeb"``. A model that applies one of the two skills perfectly
  scores 0 on it (every item is chosen so).
- the base's pretraining (:func:`compose_base_example`) copies under random keys, runs its own
  instructions (``prv``, ``lft``, ``xch``) and chains two of them (``k1>k2:``): the circuits and
  the grammar the skills build on, but none of the skills' instructions.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from .skills import Example, _word

_ALPHABET = string.ascii_lowercase


def shift_letters(text: str, by: int) -> str:
    return "".join(_ALPHABET[(_ALPHABET.index(c) + by) % 26] for c in text)


def rotate_left(text: str) -> str:
    return text[1:] + text[:1]


def swap_pairs(text: str) -> str:
    return "".join(text[i + 1] + text[i] if i + 1 < len(text) else text[i] for i in range(0, len(text), 2))


# What each instruction key does, base's and skills' alike; a random key copies.
COMPOSE_OPS: dict[str, Callable[[str], str]] = {
    "prv": lambda t: shift_letters(t, -1),
    "lft": rotate_left,
    "xch": swap_pairs,
    "sft": lambda t: shift_letters(t, 1),
    "rot": rotate_left,
    "swp": swap_pairs,
}
COMPOSE_BASE_KEYS = ("prv", "lft", "xch")
COMPOSE_KEYS = frozenset(COMPOSE_OPS)


def _random_key(rng: random.Random, reserved: frozenset[str]) -> str:
    key = _word(rng, 3, 3)
    while key in reserved:
        key = _word(rng, 3, 3)
    return key


def _apply(keys: list[str], text: str) -> str:
    for key in keys:
        text = COMPOSE_OPS.get(key, lambda t: t)(text)
    return text


def compose_base_example(rng: random.Random) -> Example:
    """The compose world's pretraining: ``key:text=`` under random keys (copy), ``prv``, ``lft``,
    ``xch``, and two of these chained, ``k1>k2:text=`` (``k1`` first). Chains teach the grammar
    the composed task uses, on instructions the base already has; the skills' keys never occur.
    Rotation and pair swaps are the base's own, under other keys: a specialist then learns what
    its key asks for, a small change (a first build whose base lacked them left the rotate and
    swap specialists at 0.33 and 0.4 after the same fine-tune, and no merge kept anything)."""
    def one() -> str:
        return rng.choice(COMPOSE_BASE_KEYS) if rng.random() < 0.6 else _random_key(rng, COMPOSE_KEYS)

    word = _word(rng, 3, 6)
    keys = [one()] if rng.random() < 0.6 else [one(), one()]
    return f"{'>'.join(keys)}:{word}=", _apply(keys, word)


def _skill_example(key: str, chained: float = 0.0) -> Callable[[random.Random], Example]:
    """Examples of one skill, ``key:word=``. Training (``chained`` > 0) also chains it with a
    random key (a copy) on either side, so the specialist learns its instruction wherever it
    stands in a chain; eval items are the plain form."""
    def example(rng: random.Random) -> Example:
        word = _word(rng, 3, 6)
        keys = [key]
        if rng.random() < chained:
            other = _random_key(rng, COMPOSE_KEYS)
            keys = [other, key] if rng.random() < 0.5 else [key, other]
        return f"{'>'.join(keys)}:{word}=", _apply(keys, word)

    return example


def rotate_shift_example(rng: random.Random) -> Example:
    """Rotate, then shift; redrawn until neither skill alone gives the answer (a word of one
    repeated letter rotates to itself, so for it rotate-then-shift equals shift)."""
    while True:
        word = _word(rng, 3, 6)
        target = shift_letters(rotate_left(word), 1)
        if target not in (shift_letters(word, 1), rotate_left(word), word):
            return f"rot>sft:{word}=", target


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "shift": _skill_example("sft"),
    "rotate": _skill_example("rot"),
    "swap": _skill_example("swp"),
    "rotate_shift": rotate_shift_example,
    "compose_base": compose_base_example,
}
# What a specialist is fine-tuned on, where that differs from its eval items.
TRAINING_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    **GENERATORS,
    "shift": _skill_example("sft", chained=0.3),
    "rotate": _skill_example("rot", chained=0.3),
    "swap": _skill_example("swp", chained=0.3),
}
