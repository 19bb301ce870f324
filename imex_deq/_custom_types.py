"""Type aliases shared across the library."""

from collections.abc import Callable
from typing import Any, Literal

from jaxtyping import Array, PyTree

State = PyTree[Array]
"""The DEQ state z: any PyTree of floating arrays."""

Args = PyTree[Any]
"""Extra inputs of the map, e.g. the layer input x."""

FixedPointFn = Callable[[State, Args], State]
"""`fn(z, args) -> z`, the map whose fixed point is sought."""

Termination = Literal["abs", "rel"]
"""`"abs"`: stop when ‖f(z) − z‖ ≤ atol; `"rel"`: when ‖f(z) − z‖ / ‖f(z)‖ ≤ rtol."""
