"""Test-wide settings: explicit rank promotion, float64 available for references."""

import os

os.environ.setdefault("JATTN_SMALL", "1")
# The tests check values, not speed, on small shapes where XLA's compile time is the
# cost: most of XLA's optimisation passes off halves the suite's CPU time (inherited by
# the notebook kernels and the subprocess tests). The benchmarks, the README's main job
# and JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest ... run the optimised compiles.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
