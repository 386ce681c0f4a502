"""The search space: named coordinates, the space they make, and the route part of it.

:mod:`~evomerge.space.coordinate` is one named dimension and its unit-cube view;
:mod:`~evomerge.space.search_space` turns a validated space config into coordinates and decodes a
point into a :class:`~evomerge.recipe.Recipe`; :mod:`~evomerge.space.route` is the random-key
encoding of layer routes (it builds coordinates; it does not know the search space). The names
the rest of evomerge imports are re-exported here.
"""

from __future__ import annotations

from evomerge.space.coordinate import Coordinate
from evomerge.space.route import RouteEncoding
from evomerge.space.search_space import NotExpressible, SearchSpace

__all__ = ["Coordinate", "NotExpressible", "RouteEncoding", "SearchSpace"]
