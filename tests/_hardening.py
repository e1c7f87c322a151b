"""What the hardening tests share: hypothesis settings, the error check and the
integers beyond int32."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def generated(max_examples: int):
    """Hypothesis settings: ``max_examples`` cases, no deadline (a first case compiles),
    no health check failing a slow case or a function-scoped fixture."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def raises(exc, fn, *names):
    """``fn()`` raises ``exc`` whose message names each of ``names``; returns the message."""
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


# Integers beyond int32, as Python ints, NumPy int64 scalars and int64 [B] arrays: jax
# without x64 would wrap them (2**32 + 1 is 1) or overflow inside jit.
too_big = st.one_of(st.integers(2**31, 2**62), st.integers(-(2**62), -(2**31) - 1))
beyond_int32 = too_big.flatmap(
    lambda i: st.sampled_from([i, np.int64(i), np.array([0, i], np.int64)])
)
