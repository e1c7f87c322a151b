"""Bad inputs to the mask/score mods (:mod:`jattn.functional.mods`) and the dropout
masks (:mod:`jattn.functional.stochastic`), generated (hypothesis): each is one clear
error naming the argument, raised when the mod is built (not from inside ``jit`` when
it is first evaluated), never a silently wrapped offset, a truncated float or a NaN
output (issue 19). Good inputs (Python ints, NumPy ints, in-range int64 arrays) still
work and give what the plain int gives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hardening import beyond_int32, generated, raises, too_big
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jattn
from jattn.functional import mods, stochastic

SETTINGS = generated(30)

INT32_MAX = 2**31 - 1
KEY = jax.random.key(0)


def _grid(mod, t=6, s=6, batch=1, heads=1):
    return np.asarray(mods.mask_grid(mod, batch, heads, t, s))


# Not integers: floats (integral ones too: 2.0 is not silently 2), bools, strings,
# float arrays, bool arrays.
not_ints = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-8, 8).map(float),
    st.booleans(),
    st.integers(0, 8).map(str),
    st.integers(-8, 8).map(np.float32),
    st.lists(st.floats(-8, 8), min_size=1, max_size=3).map(np.array),
    st.lists(st.booleans(), min_size=1, max_size=3).map(np.array),
)

# ----------------------------------------------------------- offsets (may be negative)

OFFSET_TARGETS = [
    ("offset", lambda v: mods.causal(v)),
    ("q_offset", lambda v: mods.offset(mods.causal(), v)),
    ("kv_offset", lambda v: mods.offset(mods.softcap(5.0), 0, v)),
]


@SETTINGS
@given(target=st.sampled_from(OFFSET_TARGETS), value=beyond_int32)
def test_offsets_beyond_int32_are_errors(target, value):
    """Was an OverflowError from inside jit (Python int) or a silent wrap (int64)."""
    name, call = target
    raises(ValueError, lambda: call(value), name, "int32")


@SETTINGS
@given(value=st.integers(-8, 8), batch=st.integers(1, 3))
def test_offsets_numpy_ints_give_what_ints_give(value, batch):
    want = _grid(mods.causal(value))
    for like in (np.int64(value), np.array(value, np.int64), jnp.array(value), np.int8(value)):
        np.testing.assert_array_equal(_grid(mods.causal(like)), want)
    per_example = _grid(mods.causal(np.full((batch,), value, np.int64)), batch=batch)
    np.testing.assert_array_equal(per_example, np.broadcast_to(want, per_example.shape))
    shifted = mods.offset(mods.causal(), np.int64(value), np.array(-value, np.int64))
    np.testing.assert_array_equal(_grid(shifted), _grid(mods.offset(mods.causal(), value, -value)))


@SETTINGS
@given(value=st.sampled_from([INT32_MAX, -INT32_MAX - 1, 2**30, -(2**30)]))
def test_extreme_int32_offsets_do_not_overflow(value):
    """``kv - q <= offset``: the largest offsets give all-True / all-False masks."""
    np.testing.assert_array_equal(_grid(mods.causal(value)), value > 0)
    np.testing.assert_array_equal(_grid(mods.causal(np.array([value], np.int64))), value > 0)


# ------------------------------------------------------- lengths (clipped, as elsewhere)

LENGTH_TARGETS = [
    ("q_lengths", lambda v: mods.lengths(v)),
    ("kv_lengths", lambda v: mods.lengths(None, v)),
    ("prefix_lengths", lambda v: mods.prefix_lm(v)),
]


@SETTINGS
@given(target=st.sampled_from(OFFSET_TARGETS + LENGTH_TARGETS), value=not_ints)
def test_offsets_and_lengths_refuse_non_integers(target, value):
    name, call = target
    raises(TypeError, lambda: call(value), name, "int")


@SETTINGS
@given(target=st.sampled_from(LENGTH_TARGETS), value=too_big)
def test_lengths_beyond_int32_are_clipped(target, value):
    """A length beyond every position is the whole sequence, a negative one is 0 (as
    ``sequence_mask`` and ``query_seq_lengths`` clip): the same mask, never a wrap."""
    _, call = target
    want = _grid(call(INT32_MAX if value > 0 else 0))
    for like in (value, np.int64(value), np.array([value], np.int64)):
        np.testing.assert_array_equal(_grid(call(like)), want)


@SETTINGS
@given(target=st.sampled_from(LENGTH_TARGETS), value=st.integers(-3, 9))
def test_lengths_numpy_ints_give_what_ints_give(target, value):
    _, call = target
    want = _grid(call(value))
    for like in (np.int64(value), np.array([value], np.int64), jnp.array(value)):
        np.testing.assert_array_equal(_grid(call(like)), want)


def test_index_arrays_of_wrong_rank():
    raises(TypeError, lambda: mods.causal(np.zeros((2, 2), np.int32)), "offset", "[B]")
    raises(TypeError, lambda: mods.lengths(np.zeros((2, 2), np.int32)), "q_lengths", "[B]")


# ------------------------------------------------------------------ segment ids

SEGMENT_TARGETS = [
    ("q_segment_ids", lambda v: mods.segments(v)),
    ("kv_segment_ids", lambda v: mods.segments(np.zeros((1, 3), np.int32), v)),
]


@SETTINGS
@given(target=st.sampled_from(SEGMENT_TARGETS), value=st.one_of(not_ints, beyond_int32))
def test_segment_ids(target, value):
    name, call = target
    exc = ValueError if np.issubdtype(np.asarray(value).dtype, np.integer) else TypeError
    raises(exc, lambda: call(value), name)


@SETTINGS
@given(ids=st.lists(st.integers(-(2**31), INT32_MAX), min_size=3, max_size=3))
def test_int64_segment_ids_in_range_are_ids(ids):
    want = _grid(mods.segments(np.array(ids, np.int32)), t=3, s=3)
    np.testing.assert_array_equal(_grid(mods.segments(np.array(ids, np.int64)), t=3, s=3), want)
    np.testing.assert_array_equal(want[0, 0], np.equal.outer(ids, ids))


# ------------------------------------------------- static int options (sizes, counts)

not_sizes = st.one_of(
    st.integers(-(2**40), 0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(1, 64).map(float),
    st.booleans(),
    st.integers(1, 64).map(str),
    st.integers(1, 64).map(np.float32),
    st.none(),
)

# (argument name, a call passing the value as that argument)
OPTION_TARGETS = [
    ("stride", lambda v: mods.strided(v)),
    ("dilation", lambda v: mods.dilated(2, v)),
    ("block", lambda v: mods.fixed(v)),
    ("summary", lambda v: mods.fixed(8, v)),
    ("block", lambda v: mods.bigbird(KEY, 16, v)),
    ("length", lambda v: mods.bigbird(KEY, v, 4)),
    ("window_blocks", lambda v: mods.bigbird(KEY, 16, 4, window_blocks=v)),
    ("length", lambda v: mods.global_tokens([0], v)),
    ("q_len", lambda v: mods.block_mask(mods.causal(), v, 8)),
    ("kv_len", lambda v: mods.block_mask(mods.causal(), 8, v)),
    ("batch", lambda v: mods.block_mask(mods.causal(), 8, 8, batch=v)),
    ("heads", lambda v: mods.block_mask(mods.causal(), 8, 8, heads=v)),
    ("batch", lambda v: mods.mask_grid(mods.causal(), v, 1, 4, 4)),
    ("t", lambda v: mods.mask_grid(mods.causal(), 1, 1, v, 4)),
    ("num_buckets", lambda v: mods.relative_position_bias(jnp.zeros((8, 2)), num_buckets=v)),
]
COUNT_TARGETS = [  # counts that may be 0
    ("num_global_blocks", lambda v: mods.bigbird(KEY, 16, 4, num_global_blocks=v)),
    ("num_random_blocks", lambda v: mods.bigbird(KEY, 16, 4, num_random_blocks=v)),
]


@SETTINGS
@given(target=st.sampled_from(OPTION_TARGETS), value=not_sizes)
def test_bad_int_options_name_the_argument_and_value(target, value):
    name, call = target
    assume(not (value is None and name in ("num_buckets", "length")))  # None: a default
    message = raises(ValueError, lambda: call(value), name, "int")
    assert repr(value) in message, message


@SETTINGS
@given(
    target=st.sampled_from(COUNT_TARGETS),
    value=not_sizes.filter(lambda v: not (isinstance(v, int) and v == 0)),
)
def test_bad_counts_name_the_argument(target, value):
    name, call = target
    raises(ValueError, lambda: call(value), name, "int >= 0")


@SETTINGS
@given(
    target=st.sampled_from(OPTION_TARGETS[:4] + OPTION_TARGETS[8:12]),
    value=st.integers(2**31, 2**62),
)
def test_int_options_beyond_int32_are_errors(target, value):
    """Was an OverflowError from inside jit (the option is compared with int32 positions)."""
    name, call = target
    raises(ValueError, lambda: call(value), name, "int32")


@SETTINGS
@given(value=st.integers(1, 6))
def test_numpy_int_options_give_what_ints_give(value):
    for make in (mods.strided, lambda v: mods.dilated(1, v), lambda v: mods.fixed(v + 1, v)):
        want = _grid(make(value))
        for like in (np.int64(value), np.array(value, np.int32)):
            np.testing.assert_array_equal(_grid(make(like)), want)
    want = _grid(mods.sliding_window((value, value - 1)))
    got = _grid(mods.sliding_window((np.int64(value), np.int32(value - 1))))
    np.testing.assert_array_equal(got, want)


def test_windows():
    raises(ValueError, lambda: mods.sliding_window(2**40), "window", "int32")
    raises(ValueError, lambda: mods.dilated((1, 2**40), 2), "window", "int32")
    raises(ValueError, lambda: mods.sliding_window(2.0), "window")
    # the largest windows see everything (q - kv, kv - q never overflow)
    np.testing.assert_array_equal(_grid(mods.sliding_window(INT32_MAX)), True)
    np.testing.assert_array_equal(_grid(mods.dilated(2**20, 2**20)), _grid(mods.strided(2**20)))
    np.testing.assert_array_equal(_grid(mods.dilated(2**30, 1)), True)


def test_bigbird_key():
    raises(TypeError, lambda: mods.bigbird(None, 16, 4), "key", "PRNG key")
    raises(TypeError, lambda: mods.bigbird(3, 16, 4), "key", "PRNG key")
    a = _grid(mods.bigbird(jax.random.PRNGKey(1), 16, 4), 16, 16)
    b = _grid(mods.bigbird(jax.random.wrap_key_data(jax.random.PRNGKey(1)), 16, 4), 16, 16)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ global tokens


@SETTINGS
@given(value=st.one_of(not_ints, st.integers(2**31, 2**62).map(lambda v: np.array([v]))))
def test_global_positions(value):
    array = np.asarray(value)
    if array.dtype == bool and array.ndim == 1:  # a boolean [L] array is the mask itself
        np.testing.assert_array_equal(mods.global_tokens(value).params[0], array)
        return
    exc = TypeError if array.dtype != bool and np.issubdtype(array.dtype, np.floating) else None
    exc = exc or (TypeError if array.dtype.kind in "US" else ValueError)
    raises(exc, lambda: mods.global_tokens(value, 8), "positions")


def test_global_tokens_good_inputs_agree():
    want = _grid(mods.global_tokens([1, 3], 6))
    for like in (np.array([1, 3], np.int64), jnp.array([1, 3]), [np.int64(1), np.int8(3)]):
        np.testing.assert_array_equal(_grid(mods.global_tokens(like, 6)), want)
    as_bools = [False, True, False, True, False, False]
    np.testing.assert_array_equal(_grid(mods.global_tokens(as_bools)), want)
    np.testing.assert_array_equal(_grid(mods.global_tokens(np.array(as_bools), 6)), want)
    raises(ValueError, lambda: mods.global_tokens(np.array(as_bools), 8), "length=8")
    raises(ValueError, lambda: mods.global_tokens([1, 8], 8), "positions must lie in")


# --------------------------------------------------------- float parameters: finite

non_finite = st.sampled_from([np.nan, np.inf, -np.inf])


@SETTINGS
@given(bad=non_finite, n=st.integers(1, 4), data=st.data())
def test_non_finite_score_mod_parameters(bad, n, data):
    """Were NaN outputs without a word."""
    i = data.draw(st.integers(0, n - 1))
    slopes = np.linspace(0.5, 1.0, n, dtype=np.float32)
    slopes[i] = bad
    for like in (slopes, jnp.asarray(slopes), slopes.astype(jnp.bfloat16)):
        raises(ValueError, lambda like=like: mods.alibi(like), "slopes", "finite", f"[{i}]")
    table = np.zeros((8, n), np.float32)
    table[data.draw(st.integers(0, 7)), i] = bad
    raises(ValueError, lambda: mods.relative_position_bias(table), "table", "finite")
    raises(ValueError, lambda: mods.softcap(bad), "cap", "finite")


@SETTINGS
@given(cap=st.one_of(st.booleans(), st.text(max_size=3), st.none(), st.just([1.0])))
def test_softcap_types(cap):
    raises(TypeError, lambda: mods.softcap(cap), "cap")


def test_finite_parameters_pass_and_traced_ones_are_not_checked():
    want = _grid(mods.full())  # a score_mod grid is checked through attention below
    assert want.all()
    slopes = jattn.alibi_slopes(2)
    a, b = mods.alibi(slopes), mods.alibi(np.asarray(slopes))
    np.testing.assert_array_equal(a.params[0], b.params[0])
    assert mods.softcap(np.float32(30.0)).params == mods.softcap(30).params == (30.0,)
    assert mods.softcap(jnp.array(30.0)).params == (30.0,)
    jax.jit(lambda s: mods.alibi(s).params[0])(slopes)  # a learned, traced slope passes
    raises(TypeError, lambda: mods.alibi(slopes, bidirectional="no"), "bidirectional")
    raises(ValueError, lambda: mods.softcap(-1.0), "cap must be a positive number")


# ------------------------------------------------------ functions where mods are due

not_functions = st.one_of(
    st.integers(), st.floats(), st.text(max_size=3), st.none(), st.just(np.ones((2, 2), bool))
)

MOD_TARGETS = [
    ("mods[0] of and_masks", lambda f: mods.and_masks(f)),
    ("mods[1] of or_masks", lambda f: mods.or_masks(mods.causal(), f)),
    ("mod", lambda f: mods.not_mask(f)),
    ("mod", lambda f: mods.offset(f, 1)),
    ("mods[0] of chain_scores", lambda f: mods.chain_scores(f)),
    ("mods[0] of per_head", lambda f: mods.per_head([f])),
    ("mask_mod", lambda f: mods.block_mask(f, 8, 8)),
    ("mask_mod", lambda f: mods.mask_grid(f, 1, 1, 4, 4)),
    ("fn", lambda f: mods.as_mod(f)),
    ("fn", lambda f: mods.Mod(f)),
]


@SETTINGS
@given(target=st.sampled_from(MOD_TARGETS), fn=not_functions)
def test_non_functions_name_the_argument(target, fn):
    name, call = target
    raises(TypeError, lambda: call(fn), name, "function")


def _mask3(b, n, q):
    return q >= 0


def test_mods_of_the_wrong_kind():
    """A score_mod where a mask_mod is due (and back), or a function of the wrong
    arity: a TypeError at construction naming the argument and the signature."""
    score = mods.softcap(5.0)
    m = raises(TypeError, lambda: mods.and_masks(mods.causal(), score), "mods[1]", "score_mod")
    assert "(cap, score, b, n, q, kv)" in m
    raises(TypeError, lambda: mods.chain_scores(mods.causal()), "mods[0]", "a mask_mod, not")
    raises(TypeError, lambda: mods.block_mask(score, 8, 8), "mask_mod", "a score_mod, not")
    raises(TypeError, lambda: mods.not_mask(_mask3), "mod", "(b, n, q)")
    raises(TypeError, lambda: mods.per_head(mods.causal()), "mods", "sequence")
    raises(TypeError, lambda: mods.per_head(3), "mods", "sequence")


@pytest.mark.parametrize("block_sizes", [(0, 4), (4, -1), (2.5, 4), ("8", 4), (4,), 8, "8", True])
def test_bad_block_sizes(block_sizes):
    raises(ValueError, lambda: mods.block_mask(mods.causal(), 8, 8, block_sizes), "block_sizes")


def test_good_block_sizes_agree():
    want = mods.block_mask(mods.causal(), 8, 8, (4, 4))
    got = mods.block_mask(mods.causal(), np.int64(8), 8, (np.int64(4), np.int32(4)))
    np.testing.assert_array_equal(got.block_map, want.block_map)
    assert got.seq_lengths == want.seq_lengths and got.block_sizes == want.block_sizes


Q = jnp.ones((1, 8, 2, 4), jnp.float32)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(mask_mod=lambda b, n, i, j: i - j), TypeError, "must return booleans"),
        (dict(mask_mod=lambda b, n, i, j: None), TypeError, "mask_mod must return an array"),
        (dict(mask_mod=_mask3), TypeError, "mask_mod must be a mask_mod function"),
        (dict(mask_mod=mods.softcap(2.0)), TypeError, "a score_mod, not a mask_mod"),
        (dict(score_mod=lambda x, b, n, i, j: jnp.ones(3)), ValueError, "must be elementwise"),
        (dict(score_mod=lambda x, b, n: x), TypeError, "score_mod must be a score_mod function"),
        (dict(score_mod=lambda x, b, n, i, j: i > j), TypeError, "score_mod must return floats"),
    ],
)
@pytest.mark.parametrize("impl", ["dense", "blocked"])
def test_bad_mods_in_attention(kwargs, exc, words, impl):
    """Mods that return the wrong thing, on every path, at their first evaluation."""
    attend = jattn.dot_product_attention if impl == "dense" else jattn.blocked_attention
    raises(exc, lambda: attend(Q, Q, Q, **kwargs), words)


def test_mask_mod_errors_from_block_mask():
    raises(TypeError, lambda: mods.block_mask(lambda b, n, q, kv: q - kv, 8, 8), "booleans")
    raises(ValueError, lambda: mods.block_mask(lambda b, n, q, kv: jnp.ones(3) > 0, 8, 8), "shape")
    raises(TypeError, lambda: mods.block_mask(lambda b, n, q, kv: None, 8, 8), "mask_mod")

    def own_type_error(b, n, q, kv):
        raise TypeError("my own bug")

    raises(TypeError, lambda: mods.block_mask(own_type_error, 8, 8), "my own bug")


# ------------------------------------------------------------------ dropout masks

bad_probs = st.one_of(
    st.floats(1.0, 1e6, exclude_min=True),
    st.floats(max_value=0.0, exclude_max=True),
    st.just(float("nan")),
    st.floats(0.0, 1.0).map(str),
    st.booleans(),
    st.none(),
)


@SETTINGS
@given(p=bad_probs)
def test_bad_keep_probs_and_rates(p):
    """Was "cannot convert float NaN to integer"; 1.5 and "0.5" were accepted."""
    raises(ValueError, lambda: stochastic.keep_mask(KEY, p, (2, 3)), "keep_prob", "[0, 1]")
    row = jnp.arange(2)
    raises(ValueError, lambda: stochastic.keep_bits(KEY, p, row, row), "keep_prob", "[0, 1]")
    raises(ValueError, lambda: stochastic.dropout(jnp.ones(3), p, KEY), "rate", "[0, 1]")


@SETTINGS
@given(dim=not_sizes.filter(lambda v: not (isinstance(v, int) and v == 0)), i=st.integers(0, 1))
def test_bad_keep_mask_shapes(dim, i):
    shape = [2, 3]
    shape[i] = dim
    raises(ValueError, lambda: stochastic.keep_mask(KEY, 0.5, shape), f"shape[{i}]")


def test_stochastic_errors():
    raises(TypeError, lambda: stochastic.keep_mask(KEY, 0.5, 4), "shape", "sequence")
    traced = jax.jit(lambda p: stochastic.keep_mask(KEY, p, (2, 2)))
    raises(TypeError, lambda: traced(0.5), "keep_prob", "static")
    traced = jax.jit(lambda r: stochastic.dropout(jnp.ones(3), r, KEY))
    raises(TypeError, lambda: traced(0.5), "rate", "static")
    row = jnp.arange(2)
    raises(TypeError, lambda: stochastic.keep_bits(KEY, 0.5, row * 1.0, row), "row")
    raises(TypeError, lambda: stochastic.dropout(jnp.ones(3), 0.5, None), "rng", "PRNG key")
    raises(TypeError, lambda: stochastic.dropout("ab", 0.5, KEY), "x")
    raises(TypeError, lambda: stochastic.dropout(jnp.ones((2, 2)), 0.5, KEY, broadcast_dims=0),
            "broadcast_dims")  # fmt: skip
    raises(TypeError, lambda: stochastic.dropout(jnp.ones((2, 2)), 0.5, KEY,
            broadcast_dims=(1.0,)), "broadcast_dims")  # fmt: skip
    raises(TypeError, lambda: stochastic.fold_in(KEY, 1.5), "data")
    raises(ValueError, lambda: stochastic.fold_in(KEY, 2**40), "data", "int32")
    raises(TypeError, lambda: stochastic.fold_in(None, 1), "rng", "PRNG key")
    # rate 0 and 1 need no key (deterministic use)
    x = jnp.ones(3)
    assert stochastic.dropout(x, 0.0, None) is x
    np.testing.assert_array_equal(stochastic.dropout(x, 1.0, None), 0.0)


@SETTINGS
@given(p=st.floats(0.0, 1.0), rows=st.integers(0, 3), cols=st.integers(1, 4))
def test_numpy_probs_and_dims_give_what_floats_and_ints_give(p, rows, cols):
    want = stochastic.keep_mask(KEY, p, (rows, cols))
    got = stochastic.keep_mask(KEY, np.float64(p), (np.int64(rows), np.int32(cols)))
    np.testing.assert_array_equal(got, want)
    if p < 1.0:
        x = jnp.ones((rows, cols))
        np.testing.assert_array_equal(
            stochastic.dropout(x, np.float32(p), KEY),
            stochastic.dropout(x, float(np.float32(p)), KEY),
        )
    a = stochastic.fold_in(KEY, np.int64(rows))
    b = stochastic.fold_in(KEY, jnp.uint32(rows))
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


@pytest.mark.parametrize("count", [2, 5])
def test_per_head_arrays_need_one_entry_per_head(count):
    # slopes[n] past the end would silently reuse the last slope
    q = jnp.ones((1, 6, 4, 8))
    alibi = mods.alibi(jattn.alibi_slopes(count))
    with pytest.raises(ValueError, match=f"alibi's slopes has {count} entries, one per query "
                       "head, but the call has N=4 query heads"):  # fmt: skip
        jattn.dot_product_attention(q, q, q, score_mod=alibi)
    # inside a combinator, and a T5 table's columns
    t5 = mods.relative_position_bias(jnp.zeros((8, count)))
    with pytest.raises(ValueError, match=f"table \\(its columns\\) has {count} entries"):
        jattn.dot_product_attention(q, q, q, score_mod=mods.chain_scores(mods.softcap(5.0), t5))
    ok = jattn.dot_product_attention(q, q, q, score_mod=mods.alibi(jattn.alibi_slopes(4)))
    assert ok.shape == q.shape


# (pattern, what the message names, the axis it is read along): each builds a mod from
# an int array whose length is the argument; the call has B=2 examples of T=S=6
PER_INDEX_MODS = [
    (lambda k: mods.causal(jnp.zeros(k, jnp.int32)), "causal's offset", "batch"),
    (lambda k: mods.lengths(jnp.full(k, 3)), "lengths' q_lengths", "batch"),
    (lambda k: mods.lengths(None, jnp.full(k, 3)), "lengths' kv_lengths", "batch"),
    (lambda k: mods.prefix_lm(jnp.full(k, 2)), "prefix_lm's prefix_lengths", "batch"),
    (lambda k: mods.offset(mods.causal(), jnp.zeros(k, jnp.int32)), "offset's q_offset", "batch"),
    (lambda k: mods.segments(jnp.zeros((k, 6), jnp.int32)), "q_segment_ids (its rows)", "batch"),
    (lambda k: mods.segments(jnp.zeros((2, k), jnp.int32)), "q_segment_ids (its columns)", "pos"),
    (lambda k: mods.segments(jnp.zeros((2, 6), jnp.int32), jnp.zeros((1, k), jnp.int32)),
     "kv_segment_ids (its columns)", "pos"),
    # built for a shorter length, the queries past it drew no random blocks
    (lambda k: mods.bigbird(jax.random.key(0), length=k, block=1), "bigbird's random blocks",
     "pos"),
]  # fmt: skip
Q6 = jax.random.normal(jax.random.key(3), (2, 6, 2, 4))


@generated(15)  # a case that fits compiles three programs
@given(target=st.sampled_from(PER_INDEX_MODS), count=st.integers(1, 9), combine=st.booleans())
def test_per_example_and_per_position_arrays_must_fit_the_call(target, count, combine):
    """Was a silent wrong answer: JAX clamps an index past an array's end, so [B]
    offsets or lengths for another batch size, or segment ids shorter than the sequence,
    reused their last entry (and extra entries went unused). Every path gets the error
    at its boundary (dense, blocked, a block mask), also inside a combinator; an array
    that fits (B or 1 entries, at least T or S positions) is taken."""
    build, what, axis = target
    mod = build(count)
    if combine:
        mod = mods.and_masks(mods.full(), mod)
    fits = count in (1, 2) if axis == "batch" else count >= 6
    calls = [
        lambda: jattn.dot_product_attention(Q6, Q6, Q6, mask_mod=mod),
        lambda: jattn.blocked_attention(Q6, Q6, Q6, mask_mod=mod, block_sizes=(2, 2)),
        lambda: jattn.dot_product_attention(
            Q6, Q6, Q6, block_mask=jattn.block_mask(mod, 6, 6, (2, 2), batch=2)
        ),
    ]
    if not fits:
        for call in calls:
            message = raises(ValueError, call, what, f"has {count} ")
            queries = "q_" in what or "bigbird" in what  # bigbird's names the queries first
            size = "B=2 examples" if axis == "batch" else "T=6" if queries else "S=6"
            assert size in message
        return
    want = np.asarray(calls[0]())
    assert np.isfinite(want).all()
    for call in calls[1:]:
        np.testing.assert_allclose(call(), want, rtol=1e-5, atol=1e-6)


def test_short_bigbird_and_segment_ids_are_refused_early():
    """Always (the generated test above may not draw them): a bigbird pattern built for
    length 4 gave queries 4..7 no random blocks without a word, and a block mask of
    segment ids shorter than T was built and failed only at its first use."""
    q = jnp.zeros((1, 8, 2, 4))
    short = mods.bigbird(jax.random.key(0), length=4, block=2)
    message = r"bigbird's random blocks \(built with length <= 4\) has 4 positions, but the "
    with pytest.raises(ValueError, match=message + r"call has T=8 queries"):
        jattn.dot_product_attention(q, q, q, mask_mod=short)
    for mod in (short, mods.segments(jnp.zeros((1, 5), jnp.int32))):
        with pytest.raises(ValueError, match=r"has \d positions, but the call has T=8"):
            jattn.block_mask(mod, 8, 8, (4, 4))


def test_segments_need_query_ids():
    message = raises(TypeError, lambda: mods.segments(None))  # was an IndexError
    assert message == "q_segment_ids must be an int array [B, T] or [T], got None"


@pytest.mark.parametrize("window", [np.int32(2), jnp.int32(2), np.array(2), (np.array(2), 2)])
def test_concrete_int_arrays_are_windows(window):
    q = jax.random.normal(jax.random.key(0), (1, 9, 2, 4))
    got = jattn.dot_product_attention(q, q, q, local_window_size=window)
    want = jattn.dot_product_attention(q, q, q, local_window_size=(2, 2))
    np.testing.assert_array_equal(got, want)


@settings(max_examples=15, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 8), min_size=2, max_size=2),
    per_head=st.booleans(),
)
def test_a_block_mask_for_one_example_or_head_of_a_varying_mask_is_refused(cuts, per_head):
    """Was a silent wrong answer: a block mask built with the default batch=1 (heads=1)
    from segment ids per example (a pattern per head) drove the blocked path with the
    first example's (head's) tables, skipping blocks the others see. Built for the
    call's B and N, it equals the mask_mod on the dense path."""
    q = jax.random.normal(jax.random.key(1), (2, 8, 2, 4))
    ids = jnp.asarray([[0] * c + [1] * (8 - c) for c in cuts])  # [2, 8], a cut per example
    mask_mod = mods.and_masks(mods.causal(), mods.segments(ids))
    if per_head:
        mask_mod = mods.and_masks(mask_mod, mods.per_head([mods.full(), mods.sliding_window(1)]))
    names = ("block_mask was built for batch=1, heads=1", "example b", "B=2", "batch=2")
    if per_head:
        names += ("head n", "heads=2")
    bm = jattn.block_mask(mask_mod, 8, 8, (4, 4))
    raises(ValueError, lambda: jattn.dot_product_attention(q, q, q, block_mask=bm), *names)
    bm = jattn.block_mask(mask_mod, 8, 8, (4, 4), batch=2, heads=2)
    got = jattn.dot_product_attention(q, q, q, block_mask=bm, implementation="blocked")
    want = jattn.dot_product_attention(q, q, q, mask_mod=mask_mod, implementation="dense")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a mask the same for every example and head: one table serves them all
    bm = jattn.block_mask(mods.causal(), 8, 8, (4, 4))
    assert bm.varies == (False, False)
    got = jattn.dot_product_attention(q, q, q, block_mask=bm, implementation="blocked")
    want = jattn.dot_product_attention(q, q, q, is_causal=True, implementation="dense")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
