"""The toy worlds ``evomerge toy build --world`` knows: which specialists, which data, which seed.

Two worlds, so that nothing in the project is tuned to one:

- ``pair`` (the default, seed 0): two specialists, ``arith`` and ``reverse``. Task arithmetic
  with weights 1 keeps both skills; a 50/50 average keeps neither.
- ``compose`` (seed 1): three specialists, ``shift``, ``rotate`` and ``swap``, and one composed
  task, ``rotate_shift`` (rotate, then shift the result), that no specialist was trained on and
  no single skill answers: the place where stacking one specialist's layers above another's
  could do what a weighted average of them cannot.

Both share the recipe that makes merging work on a toy (see :mod:`evomerge.toy.build`): a base
pretrained on instructions related to the skills, gentle answer-only fine-tunes with half of each
batch replaying the base's data (the pair world's at a lower rate; see below).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError
from .train import TrainSettings

BASE_TRAINING = TrainSettings(steps=700, lr=3e-3, batch_size=64, warmup=20, answer_only=True)
SPECIALIST_TRAINING = TrainSettings(steps=300, lr=4e-4, batch_size=64, warmup=20, answer_only=True)
# The pair world's fine-tunes run at 1.5e-4, not 4e-4: under the pinned kernels, 4e-4 made task
# arithmetic (weights 1) keep arith and lose reverse (0.955 / 0.020 on the search split); on the
# same pinned base, 2e-4 kept 0.980 / 0.670, 1.5e-4 0.950 / 0.775 and 1e-4 0.850 / 0.780 with
# weaker specialists (0.975 / 0.955). Smaller task vectors interfere less; the trend is smooth in
# the rate, not a lucky rounding.
PAIR_SPECIALIST_TRAINING = TrainSettings(steps=300, lr=1.5e-4, batch_size=64, warmup=20, answer_only=True)


@dataclass(frozen=True)
class WorldSpec:
    """What a world is built from; the build turns it into models, a table and a manifest."""

    name: str
    default_seed: int
    base_data: str  # the generator kind the base is pretrained on
    specialists: tuple[str, ...]  # one specialist fine-tuned per skill
    composed: tuple[str, ...] = ()  # tasks scored too, with no specialist of their own
    # modules (in evomerge.toy) holding this world's data besides skills.py: its recipe's code
    data_modules: tuple[str, ...] = ()
    base_training: TrainSettings = BASE_TRAINING
    specialist_training: TrainSettings = SPECIALIST_TRAINING
    # Fraction of each fine-tuning batch drawn from the base's pretraining data: anchors the
    # specialists' behaviour outside their skill, which keeps their task vectors from interfering.
    replay_fraction: float = 0.5
    # Whether the table must show hand-set task arithmetic keeping half of every specialist's
    # advantage. The pair world was made for it; in the compose world three task vectors summed
    # at weight 1 interfere (measured: 0.24-0.66 of each skill kept), which leaves a search room
    # to beat every hand-set merge. Decides no weight, so the recipe fingerprint leaves it out.
    hand_merge_keeps_half: bool = True

    @property
    def skills(self) -> tuple[str, ...]:
        """Every skill with eval tasks in this world, specialists' first, then composed ones."""
        return (*self.specialists, *self.composed)


WORLDS: dict[str, WorldSpec] = {
    "pair": WorldSpec(name="pair", default_seed=0, base_data="base", specialists=("arith", "reverse"),
                      specialist_training=PAIR_SPECIALIST_TRAINING),
    "compose": WorldSpec(
        name="compose",
        default_seed=1,
        base_data="compose_base",
        data_modules=("compose_skills",),
        specialists=("shift", "rotate", "swap"),
        composed=("rotate_shift",),
        # More to pretrain than the pair world's base (two instructions and their chains).
        base_training=replace(BASE_TRAINING, steps=900),
        hand_merge_keeps_half=False,
    ),
}
DEFAULT_WORLD = "pair"


def world_spec(name: str) -> WorldSpec:
    """The world called ``name``; a clear error naming the worlds there are otherwise."""
    try:
        return WORLDS[name]
    except KeyError:
        raise ConfigError(f"--world {name!r}: no such toy world; choose one of {', '.join(WORLDS)}") from None
