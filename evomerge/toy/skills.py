"""Deterministic data for the toy worlds: each base's generic text and one generator per skill.

Every example is a ``(context, target)`` pair of plain strings; the model sees
``BOS + context + target + EOS`` and a skill counts as learned when ``target`` is the greedy
continuation of ``context`` (lm-eval's loglikelihood ``acc``).

The ``pair`` world (two specialists):

- ``arith``: digit arithmetic, the nine's complement ``999... - n``: ``"neg:3719="`` -> ``"6280"``.
- ``reverse``: string reversal, ``"rev:abcde="`` -> ``"edcba"``.
- the base's pretraining (:func:`base_example`) copies inputs under random instruction keys and
  counts: it has the circuits both skills build on but neither skill, so each specialist has a
  clear advantage to add and a merge something to keep.

The ``compose`` world's data is :mod:`evomerge.toy.compose_skills`'.

Evaluation items are drawn first from a fixed seed (:func:`eval_items`) and every training stream
skips them, so no build seed can leak an eval item into training.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator

Example = tuple[str, str]

SKILLS: tuple[str, ...] = ("arith", "reverse")  # the pair world's; worlds.py lists every world
# Eval items are the same for every build seed: they are shipped as JSONL in eval_tasks/.
EVAL_SEED = 20240611
EVAL_SPLITS: dict[str, int] = {"search": 200, "heldout": 200}


def _digits(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(low, high)))


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def arith_example(rng: random.Random) -> Example:
    """Nine's complement, ``999... - n``: digit arithmetic that needs no carries."""
    digits = _digits(rng, 3, 6)
    return f"neg:{digits}=", "".join(str(9 - int(d)) for d in digits)


def reverse_example(rng: random.Random) -> Example:
    word = _word(rng, 3, 6)
    return f"rev:{word}=", word[::-1]


# Keys with a meaning: the base's generic copy instructions never use them.
SKILL_KEYS = frozenset({"neg", "rev", "inc", "bwd"})


def base_example(rng: random.Random) -> Example:
    """Generic text the base is pretrained on: ``key:input=input`` for random keys, ``bwd``
    (write the input backwards) and ``inc`` (add one).

    It teaches the instruction shape, attending back to the input, and writing letters and
    digits, but neither skill: ``rev:`` is just another unknown key, so the base copies. The
    reversal circuit comes from ``bwd``: a specialist that learns what ``rev:`` asks for changes
    little, the way fine-tuning an LLM mostly teaches it to use what pretraining built; a specialist
    that had to build reversal from scratch changes every attention layer, and no merge kept it.
    The random keys matter for merging too: replayed while fine-tuning, they make each specialist
    act on its own key only, not on "any key but the ones I saw".
    """
    kind = rng.random()
    if kind < 0.15:
        n = rng.randint(0, 998)
        return f"inc:{n}=", str(n + 1)
    text = _word(rng, 3, 6) if rng.random() < 0.55 else _digits(rng, 3, 6)
    if kind < 0.35:
        return f"bwd:{text}=", text[::-1]
    key = _word(rng, 3, 3)
    while key in SKILL_KEYS:
        key = _word(rng, 3, 3)
    return f"{key}:{text}=", text


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "arith": arith_example,
    "reverse": reverse_example,
    "base": base_example,
}


def _generators(training: bool) -> dict[str, Callable[[random.Random], Example]]:
    """Every world's generators by kind; ``training`` picks what specialists are fine-tuned on
    where that differs from their eval items. Other worlds' data lives in their own modules, so
    editing one world's data changes no other world's recipe fingerprint."""
    from . import compose_skills

    return {**GENERATORS, **(compose_skills.TRAINING_GENERATORS if training else compose_skills.GENERATORS)}


# Skills whose eval items are shipped in eval_tasks/ (and never trained on), every world's.
EVAL_SKILLS: tuple[str, ...] = ("arith", "reverse", "shift", "rotate", "swap", "rotate_shift")


def eval_items(skill: str) -> dict[str, list[Example]]:
    """The fixed, disjoint eval splits of one skill (search first, then held-out), no duplicates."""
    rng = random.Random(f"{EVAL_SEED}:{skill}")
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split, count in EVAL_SPLITS.items():
        items: list[Example] = []
        while len(items) < count:
            context, target = _generators(training=False)[skill](rng)
            if context not in seen:
                seen.add(context)
                items.append((context, target))
        splits[split] = items
    return splits


def eval_contexts() -> frozenset[str]:
    """Every context in any eval split of any skill of any world: training never emits one."""
    return frozenset(c for skill in EVAL_SKILLS for items in eval_items(skill).values() for c, _ in items)


def training_stream(kind: str, seed: int) -> Iterator[Example]:
    """An endless, seeded stream of training examples of one kind (a skill or ``"base"``)."""
    rng = random.Random(f"{seed}:{kind}")
    banned = eval_contexts()
    generate = _generators(training=True)[kind]
    while True:
        example = generate(rng)
        if example[0] not in banned:
            yield example
