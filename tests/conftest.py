"""Test-wide settings: explicit rank promotion, float64 available for references."""

import os

os.environ.setdefault("JATTN_SMALL", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
