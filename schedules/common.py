"""Parameters every backend shares: the top-p search strategy and its knobs (ALGORITHMS.md)."""

from __future__ import annotations

from .space import Param, Space

TOP_P_STRATEGIES = ("sort", "bisect", "radix")

TOP_P = Space("top_p", (
    Param("top_p_strategy", TOP_P_STRATEGIES, "bisect",
          doc="sort + cumsum (exact reference), bisection on a threshold, or radix select"),
    Param("bisect_stop", ("eps", "iters"), "eps", when=(("top_p_strategy", ("bisect",)),),
          doc="stop when the bracket is below eps, or after a fixed iteration count"),
    Param("bisect_eps", (1e-4, 1e-5, 1e-6), 1e-5,
          when=(("top_p_strategy", ("bisect",)), ("bisect_stop", ("eps",)))),
    Param("bisect_iters", (8, 12, 16, 24, 32), 16,
          when=(("top_p_strategy", ("bisect",)), ("bisect_stop", ("iters",)))),
    Param("radix_bits", (4, 8, 11), 8, when=(("top_p_strategy", ("radix",)),),
          doc="bits of the weights' float32 pattern resolved per histogram pass"),
))
