"""Parameters every backend shares: the top-p search strategy and its knobs (ALGORITHMS.md)."""

from __future__ import annotations

from .space import Param, Space

TOP_P_STRATEGIES = ("sort", "bisect", "radix")

TOP_P = Space("top_p", (
    Param("top_p_strategy", TOP_P_STRATEGIES, "bisect",
          doc="sort + cumsum (exact reference), bisection on a threshold, or radix select"),
    Param("bisect_stop", ("mass", "eps", "iters"), "mass",
          when=(("top_p_strategy", ("bisect",)),),
          doc="stop when the bracket holds at most bisect_mass of the row's mass (the kept mass "
              "is then within p and p + bisect_mass at any context), when it is below an "
              "absolute eps (Twilight's rule), or after a fixed iteration count"),
    Param("bisect_mass", (1e-2, 1e-3, 1e-4), 1e-3,
          when=(("top_p_strategy", ("bisect",)), ("bisect_stop", ("mass",)))),
    Param("bisect_eps", (1e-5, 1e-6), 1e-5,
          when=(("top_p_strategy", ("bisect",)), ("bisect_stop", ("eps",))),
          doc="absolute, on weights that sum to 1 (Twilight's 1e-5): the extra mass it keeps "
              "grows with the context, as the weights near the cut shrink to its size; 1e-4 "
              "failed the correctness gate on SmolLM2's 8k snapshot"),
    Param("bisect_iters", (16, 24, 32), 24,
          when=(("top_p_strategy", ("bisect",)), ("bisect_stop", ("iters",))),
          doc="resolution max w / 2^iters: 12 steps kept every token of some 8k rows"),
    Param("radix_bits", (4, 8, 11), 8, when=(("top_p_strategy", ("radix",)),),
          doc="bits of the weights' float32 pattern resolved per histogram pass"),
))
