"""The optimizer: AdamW on a warmup + decay schedule with global-norm clipping."""

from __future__ import annotations

import functools

import jax
import optax

from jattn.functional import _checks

__all__ = ["learning_rate_schedule", "make_optimizer"]


def learning_rate_schedule(
    peak: float,
    *,
    num_steps: int,
    warmup_steps: int,
    decay: str = "cosine",
    end_factor: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak``, then cosine or linear decay to ``peak * end_factor``.

    ``peak`` a finite float > 0, ``num_steps`` a positive int, ``warmup_steps`` an int >= 0,
    ``end_factor`` >= 0 (a negative one would end in gradient ascent)."""
    peak = _checks.check_finite_scalar("peak", peak, positive=True)
    num_steps = _checks.check_size("num_steps", num_steps)
    warmup_steps = _checks.check_size("warmup_steps", warmup_steps, minimum=0)
    end_factor = _checks.check_finite_scalar("end_factor", end_factor)
    if end_factor < 0.0:
        raise ValueError(f"end_factor must be >= 0 (a multiple of peak), got {end_factor!r}")
    end = peak * end_factor
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps, max(num_steps, warmup_steps + 1), end_value=end
        )
    if decay == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup_steps),
                optax.linear_schedule(peak, end, max(num_steps - warmup_steps, 1)),
            ],
            [warmup_steps],
        )
    raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")


@functools.lru_cache(maxsize=32)
def make_optimizer(
    *, weight_decay: float = 0.0, clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.98
) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW at unit learning rate (no weight decay on biases
    and norm scales).

    The train step multiplies the updates by the scheduled learning rate, which it
    takes as an input: schedule options (number of steps, warmup, decay) then do not
    change the compiled program. Cached, so the same options give the same object and
    steps jitted for it are reused by later runs in the same process.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(1.0, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )
