from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.pareto import dominates, pareto_front


@dataclass(frozen=True)
class P:
    """A stand-in trial: what pareto_front reads, plus an id to compare fronts by."""

    id: int
    objectives: dict[str, float] | None
    violation: float = 0.0


DIRS = {"acc": "maximize", "l2": "minimize"}


def test_front_of_a_hand_made_set():
    pts = [
        P(0, {"acc": 0.9, "l2": 5.0}),
        P(1, {"acc": 0.8, "l2": 2.0}),
        P(2, {"acc": 0.7, "l2": 3.0}),  # dominated by 1
        P(3, {"acc": 0.9, "l2": 6.0}),  # dominated by 0 (equal acc, worse l2)
        P(4, None),  # failed: ignored
        P(5, {"acc": 0.99, "l2": 0.1}, violation=1.0),  # infeasible: beaten by any feasible trial
        P(6, {"acc": 0.5, "l2": float("nan")}),  # unusable value: ignored
    ]
    assert [p.id for p in pareto_front(pts, DIRS)] == [0, 1]


def test_direction_matters():
    pts = [P(0, {"l2": 1.0}), P(1, {"l2": 2.0})]
    assert [p.id for p in pareto_front(pts, {"l2": "minimize"})] == [0]
    assert [p.id for p in pareto_front(pts, {"l2": "maximize"})] == [1]


def test_infeasible_only_front_keeps_the_least_violating():
    pts = [
        P(0, {"acc": 0.95, "l2": 0.5}, violation=2.0),  # better on both, but breaks the bound more
        P(1, {"acc": 0.9, "l2": 1.0}, violation=0.5),
        P(2, {"acc": 0.2, "l2": 1.0}, violation=0.5),  # same violation, worse acc: dominated
    ]
    assert [p.id for p in pareto_front(pts, DIRS)] == [1]


def test_equal_points_do_not_dominate_each_other():
    a, b = {"acc": 0.5, "l2": 1.0}, {"acc": 0.5, "l2": 1.0}
    assert not dominates(a, b, DIRS) and not dominates(b, a, DIRS)
    assert len(pareto_front([P(0, a), P(1, b)], DIRS)) == 2


def test_bad_direction_is_refused():
    with pytest.raises(ValueError, match="maximise"):
        pareto_front([P(0, {"acc": 1.0})], {"acc": "maximise"})


# Small integer grids make ties and duplicates common, which is where dominance code goes wrong.
_objs = st.fixed_dictionaries({"acc": st.integers(0, 4).map(float), "l2": st.integers(0, 4).map(float)})
_point = st.tuples(st.one_of(st.none(), _objs), st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0]))
_points = st.lists(_point, max_size=25).map(
    lambda xs: [P(i, o, v) for i, (o, v) in enumerate(xs)]
)
_dirs = st.fixed_dictionaries({"acc": st.sampled_from(["maximize", "minimize"]), "l2": st.sampled_from(["maximize", "minimize"])})


def _dom(a: P, b: P, dirs) -> bool:
    return dominates(a.objectives, b.objectives, dirs, violation_a=a.violation, violation_b=b.violation)


@settings(max_examples=200, deadline=None)
@given(_points, _dirs)
def test_no_member_is_dominated_and_every_other_candidate_is(points, dirs):
    front = pareto_front(points, dirs)
    ids = {p.id for p in front}
    candidates = [p for p in points if p.objectives is not None]
    assert all(p.objectives is not None for p in front)
    for m in front:
        assert not any(_dom(o, m, dirs) for o in candidates)
    for p in candidates:
        if p.id not in ids:
            assert any(_dom(m, p, dirs) for m in front)
    if candidates:
        assert front


@settings(max_examples=100, deadline=None)
@given(_points, _dirs, st.randoms())
def test_front_is_invariant_under_permutation(points, dirs, rnd):
    shuffled = list(points)
    rnd.shuffle(shuffled)
    assert {p.id for p in pareto_front(points, dirs)} == {p.id for p in pareto_front(shuffled, dirs)}


@settings(max_examples=100, deadline=None)
@given(_points, _dirs)
def test_feasible_trials_beat_infeasible_ones(points, dirs):
    front = pareto_front(points, dirs)
    if any(p.objectives is not None and p.violation == 0 for p in points):
        assert all(m.violation == 0 for m in front)
