"""The `Runner` type of voxport/runtime/backends/base.py (a graph call: named arrays in, named arrays
out), without the records module that file imports."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
