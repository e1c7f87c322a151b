"""Every validation message of the functional core and the layers, eagerly and under jit.

Errors are raised while tracing, so each array-argument case is also checked inside
``jax.jit`` (no compilation happens: tracing fails first).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.layers import AdditiveAttention, DotProductAttention, MultiHeadAttention


def _x(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _raises(exc, message, fn, *arrays, **options):
    """``fn(*arrays, **options)`` raises ``exc`` whose text contains ``message``, eager and jit."""
    match = re.escape(message)
    with pytest.raises(exc, match=match):
        fn(*arrays, **options)
    with pytest.raises(exc, match=match):
        jax.jit(lambda *a: fn(*a, **options))(*arrays)


Q, KV = _x(2, 4, 4, 8), _x(2, 5, 2, 8)  # N=4, K=2, H=8, T=4, S=5
dpa = jattn.dot_product_attention


# ------------------------------------------------------------------ query, key, value


@pytest.mark.parametrize("fn", [jattn.dot_product_attention, jattn.attention])
def test_rank(fn):
    _raises(
        ValueError,
        "query must have shape [..., T, N, H] (rank >= 3), got [4, 8]",
        fn,
        _x(4, 8),
        KV,
        KV,
    )
    _raises(ValueError, "key must have shape [..., S, K, H] (rank >= 3), got [5]", fn, Q, _x(5), KV)


def test_ranks_differ():
    _raises(
        ValueError,
        "query, key and value must have the same rank, got query [2, 4, 4, 8], "
        "key [5, 2, 8], value [5, 2, 8]",
        dpa,
        Q,
        _x(5, 2, 8),
        _x(5, 2, 8),
    )


def test_batch_dims_differ():
    _raises(
        ValueError,
        "query, key and value batch dimensions differ: query [2, 4, 4, 8], key [3, 5, 2, 8]",
        dpa,
        Q,
        _x(3, 5, 2, 8),
        _x(3, 5, 2, 8),
    )


def test_key_value_lengths_differ():
    _raises(
        ValueError,
        "key and value lengths differ: key [2, 5, 2, 8], value [2, 6, 2, 8]",
        dpa,
        Q,
        KV,
        _x(2, 6, 2, 8),
    )


def test_key_value_heads_differ():
    _raises(
        ValueError,
        "key and value head counts differ: key [2, 5, 2, 8], value [2, 5, 1, 8]",
        dpa,
        Q,
        KV,
        _x(2, 5, 1, 8),
    )


def test_heads_do_not_divide():
    _raises(
        ValueError,
        "the number of query heads N=3 must be a multiple of the number of key/value heads K=2",
        dpa,
        _x(2, 4, 3, 8),
        KV,
        KV,
    )


def test_head_dim_mismatch():
    _raises(
        ValueError,
        "query and key head dims differ: query [2, 4, 4, 6], key [2, 5, 2, 8]",
        dpa,
        _x(2, 4, 4, 6),
        KV,
        KV,
    )


def test_dtypes():
    _raises(
        ValueError,
        "query, key and value dtypes differ: float32, bfloat16, float32",
        dpa,
        Q,
        KV.astype(jnp.bfloat16),
        KV,
    )
    _raises(
        TypeError,
        "value must have a floating dtype, got int32",
        dpa,
        Q,
        KV,
        KV.astype(jnp.int32),
    )


def test_not_an_array():
    for bad, name in (("abc", "str"), (None, "NoneType"), ({"a": 1}, "dict")):
        with pytest.raises(TypeError, match=f"query must be an array, got {name}"):
            dpa(bad, KV, KV)


# ------------------------------------------------------------------ mask, bias, lengths


def test_mask_must_be_boolean():
    _raises(
        TypeError,
        "mask must be boolean (True = attend), got dtype float32; pass additive float "
        "masks as bias",
        dpa,
        Q,
        KV,
        KV,
        None,
        _x(2, 1, 4, 5),
    )


def test_mask_and_bias_must_broadcast():
    _raises(
        ValueError,
        "mask of shape [2, 3, 4, 5] does not broadcast to [..., N, T, S] = [2, 4, 4, 5]",
        dpa,
        Q,
        KV,
        KV,
        None,
        _x(2, 3, 4, 5, dtype=bool),
    )
    _raises(
        ValueError,
        "bias of shape [1, 2, 4, 4, 5] does not broadcast to [..., N, T, S] = [2, 4, 4, 5]",
        dpa,
        Q,
        KV,
        KV,
        _x(1, 2, 4, 4, 5),
    )
    _raises(ValueError, "bias of shape [4, 6]", dpa, Q, KV, KV, _x(4, 6))
    _raises(
        TypeError, "bias must have a floating dtype, got bool", dpa, Q, KV, KV, _x(4, 5, dtype=bool)
    )


def test_seq_lengths():
    _raises(
        TypeError,
        "query_seq_lengths must be an integer array, got dtype float32",
        lambda q, k, v, n: dpa(q, k, v, query_seq_lengths=n),
        Q,
        KV,
        KV,
        _x(2),
    )
    _raises(
        ValueError,
        "key_value_seq_lengths of shape [3] must have (or broadcast to) the batch shape of "
        "query [2] (one length per example)",
        lambda q, k, v, n: dpa(q, k, v, key_value_seq_lengths=n),
        Q,
        KV,
        KV,
        _x(3, dtype=jnp.int32),
    )
    _raises(
        ValueError,
        "query_seq_lengths of shape [2, 2] must have (or broadcast to) the batch shape of "
        "query [2]",
        lambda q, k, v, n: dpa(q, k, v, query_seq_lengths=n),
        Q,
        KV,
        KV,
        _x(2, 2, dtype=jnp.int32),
    )


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("window", [-1, (1, -2), (1, 2, 3), 1.5, "2", True, (1, False)])
def test_bad_window(window):
    message = "window must be a non-negative int or a pair (left, right) of non-negative ints"
    _raises(ValueError, message, dpa, Q, KV, KV, local_window_size=window)
    with pytest.raises(ValueError, match=re.escape(message)):
        jattn.sliding_window_mask(4, 5, window)


@pytest.mark.parametrize("impl", ["dense", "blocked"])
def test_empty_heads_or_head_dim_are_named(impl):
    """N=0 gave a score-function error on one path and an empty result on the other;
    H=0 a ZeroDivisionError."""
    _raises(
        ValueError, "the number of query heads N=0 must be a multiple", dpa,
        _x(2, 4, 0, 8), _x(2, 5, 1, 8), _x(2, 5, 1, 8), implementation=impl,
    )  # fmt: skip
    _raises(
        ValueError, "the head dim H of query [2, 4, 2, 0] must be > 0", dpa,
        _x(2, 4, 2, 0), _x(2, 5, 2, 0), _x(2, 5, 2, 8), implementation=impl,
    )  # fmt: skip


def test_flags_are_static_bools():
    for name in ("is_causal", "return_weights", "return_residual"):
        _raises(TypeError, f"{name} must be a bool, got 'yes'", dpa, Q, KV, KV, **{name: "yes"})
        for fn in (dpa, jattn.attention):
            with pytest.raises(TypeError, match=f"{name} must be a static Python bool"):
                jax.jit(lambda q, k, v, c, fn=fn, name=name: fn(q, k, v, **{name: c}))(
                    Q, KV, KV, True
                )
    with pytest.raises(TypeError, match="is_causal must be a bool, got 1"):
        jattn.blocked_attention(Q, KV, KV, is_causal=1)
    assert dpa(Q, KV, KV, is_causal=np.bool_(True)).shape == Q.shape


def test_traced_dropout_rate_names_the_fix():
    with pytest.raises(TypeError, match="dropout_rate must be a static Python float"):
        jax.jit(lambda r: dpa(Q, KV, KV, dropout_rate=r, dropout_rng=jax.random.key(0)))(0.1)


def test_traced_window_names_the_fix():
    """A window passed through jax.jit as an argument is traced: say it must be static."""
    message = "window sizes set the shape of the computation, so they must be static"
    for window in ((3, 0), 3):
        with pytest.raises(TypeError, match=message):
            jax.jit(lambda q, k, v, w: dpa(q, k, v, local_window_size=w))(Q, KV, KV, window)
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda w: jattn.sliding_window_mask(4, 5, w))(2)


@pytest.mark.parametrize("rate", [1.0, -0.1, 2, True, "0.1"])
def test_bad_dropout_rate(rate):
    _raises(
        ValueError,
        f"dropout_rate must be in [0, 1), got {rate!r}",
        dpa,
        Q,
        KV,
        KV,
        dropout_rate=rate,
        dropout_rng=jax.random.key(0),
    )


def test_dropout_rate_may_be_a_numpy_number():
    out = jax.eval_shape(
        lambda q, k, v: dpa(q, k, v, dropout_rate=np.float32(0.25), dropout_rng=jax.random.key(0)),
        Q,
        KV,
        KV,
    )
    assert out.shape == Q.shape


def test_dropout_needs_rng():
    _raises(
        ValueError, "dropout_rate=0.1 needs a dropout_rng (a PRNG key)", dpa, Q, KV, KV,
        dropout_rate=0.1,
    )  # fmt: skip


def test_bad_fully_masked():
    message = "fully_masked must be one of ('zeros', 'uniform'), got 'nan'"
    _raises(ValueError, message, dpa, Q, KV, KV, fully_masked="nan")
    _raises(ValueError, message, jattn.masked_softmax, _x(3, 4), fully_masked="nan")


def test_bad_implementation():
    _raises(ValueError, "unknown implementation 'fast'", dpa, Q, KV, KV, implementation="fast")


def test_bad_scale():
    _raises(TypeError, "scale must be a real number or None, got str", dpa, Q, KV, KV, scale="1")
    _raises(TypeError, "scale must be a real number or None, got bool", dpa, Q, KV, KV, scale=True)


def test_numpy_scalars_are_numbers():
    """np.float32 scales and np.int64 windows (jax.nn accepts them) equal Python ones."""
    np.testing.assert_array_equal(
        dpa(Q, KV, KV, scale=np.float32(0.5), local_window_size=np.int64(1)),
        dpa(Q, KV, KV, scale=0.5, local_window_size=1),
    )


def test_lengths_beyond_int32_do_not_wrap():
    """uint32 lengths past 2**31 mean 'all of it', not a negative length."""
    for big in (2**32 - 1, 2**31):
        lengths = jnp.array([big, 3], jnp.uint32)
        got = dpa(Q, KV, KV, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
        want = dpa(Q, KV, KV, query_seq_lengths=jnp.array([4, 3]), key_value_seq_lengths=[5, 3])
        np.testing.assert_array_equal(got, want)


def test_no_keys_gives_zeros_as_jax_nn():
    kv = _x(2, 0, 2, 8)
    for impl in (None, "dense"):
        out, weights = dpa(Q, kv, kv, implementation=impl, return_weights=True)
        np.testing.assert_array_equal(out, jax.nn.dot_product_attention(Q, kv, kv))
        assert weights.shape == (2, 4, 4, 0) and not np.any(np.isnan(out))
    _raises(ValueError, "blocked attention needs T > 0 and S > 0, got T=4, S=0", dpa, Q, kv, kv,
            implementation="blocked")  # fmt: skip


def test_score_fn_wrong_shape():
    _raises(
        ValueError,
        "score_fn returned logits of shape [4], expected [T, S] = [4, 5]",
        jattn.attention,
        Q,
        KV,
        KV,
        score_fn=lambda q, k, p: jnp.sum(q, axis=-1),
    )


def test_per_head_params_leading_axis():
    _raises(
        ValueError,
        "per_head_params=True needs every score_params leaf to have a leading axis N=4, "
        "got a leaf of shape [3, 8, 8]",
        lambda q, k, v, w: jattn.attention(
            q, k, v, score_fn=jattn.bilinear_scores, score_params=w, per_head_params=True
        ),
        Q,
        KV,
        KV,
        _x(3, 8, 8),
    )


# ------------------------------------------------------------------ masks and pooling


def test_mask_builder_errors():
    with pytest.raises(TypeError, match="lengths must be integers, got dtype float32"):
        jattn.sequence_mask(_x(3), 4)
    with pytest.raises(
        ValueError,
        match=re.escape("valid_lens must have shape [B] or [B, T] with T=4, got [2, 3]"),
    ):
        jattn.valid_lens_mask(_x(2, 3, dtype=jnp.int32), 4, 5)
    with pytest.raises(ValueError, match=re.escape("valid_lens must have shape [B] or [B, T]")):
        jattn.valid_lens_mask(jnp.int32(3), 4, 5)
    with pytest.raises(ValueError, match=re.escape("key_valid must have shape [B, S], got [5]")):
        jattn.key_padding_mask(_x(5, dtype=bool))


def test_pooling_shapes():
    _raises(
        ValueError,
        "attention_pooling expects weights [T, S] and values [S, Hv], got weights [3, 4] "
        "and values [5, 2]",
        jattn.attention_pooling,
        _x(3, 4),
        _x(5, 2),
    )


# ------------------------------------------------------------------ layers


def _raises_config(message, cls, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(*args, **kwargs, rngs=nnx.Rngs(0))


def test_multihead_config_errors():
    _raises_config("num_heads must be a positive int, got 0", MultiHeadAttention, 0, 8)
    _raises_config("in_features must be a positive int, got -8", MultiHeadAttention, 2, -8)
    _raises_config("qkv_features=10 must be divisible by num_heads=4", MultiHeadAttention, 4, 8, 10)
    _raises_config(
        "num_heads=4 must be a multiple of num_kv_heads=3",
        MultiHeadAttention,
        4,
        8,
        num_kv_heads=3,
    )
    _raises_config(
        "dropout_rate must be in [0, 1), got 1.5", MultiHeadAttention, 2, 8, dropout_rate=1.5
    )
    _raises_config("v_head_dim must be a positive int, got 2.5", MultiHeadAttention, 2, 8,
                   v_head_dim=2.5)  # fmt: skip
    # 0 is a value, not "use the default"
    for name in ("qkv_features", "out_features", "num_kv_heads", "in_kv_features",
                 "in_value_features", "v_head_dim"):  # fmt: skip
        _raises_config(f"{name} must be a positive int, got 0", MultiHeadAttention, 2, 8,
                       **{name: 0})  # fmt: skip


def test_multihead_call_errors():
    layer = MultiHeadAttention(2, 8, in_kv_features=6, rngs=nnx.Rngs(0))
    x, y = _x(2, 3, 8), _x(2, 5, 6)
    jitted = nnx.jit(lambda m, *a, **kw: m(*a, **kw))
    for call in (lambda *a, **kw: layer(*a, **kw), lambda *a, **kw: jitted(layer, *a, **kw)):
        with pytest.raises(ValueError, match="inputs_v was given without inputs_k"):
            call(x, None, y)
        with pytest.raises(
            ValueError, match=re.escape("inputs_q must have shape [..., L, 8], got [2, 3, 7]")
        ):
            call(_x(2, 3, 7), y)
        with pytest.raises(
            ValueError, match=re.escape("inputs_k must have shape [..., L, 6], got [2, 3, 8]")
        ):
            call(x)  # self-attention, but the key projection expects width 6
        with pytest.raises(
            ValueError,
            match=re.escape(
                "inputs_k [2, 5, 6] and inputs_v [2, 4, 6] must agree on all but the feature axis"
            ),
        ):
            call(x, y, _x(2, 4, 6))
        with pytest.raises(ValueError, match=re.escape("mask of shape [2, 3, 3, 5]")):
            call(x, y, mask=_x(2, 3, 3, 5, dtype=bool))


def test_single_head_layer_errors():
    with pytest.raises(ValueError, match=re.escape("dropout_rate must be in [0, 1), got 1.0")):
        DotProductAttention(1.0)
    with pytest.raises(ValueError, match=re.escape("dropout_rate > 0 needs rngs=nnx.Rngs")):
        DotProductAttention(0.1)
    dot = DotProductAttention()
    q, k, v = _x(2, 3, 4), _x(2, 5, 4), _x(2, 5, 6)
    with pytest.raises(
        ValueError, match=re.escape("queries must have shape [B, L, F], got [3, 4]")
    ):
        dot(q[0], k, v)
    with pytest.raises(ValueError, match="must share B, and keys and values must share S"):
        dot(q, k, v[:, :4])
    with pytest.raises(ValueError, match="must share B"):
        dot(q[:1], k, v)
    with pytest.raises(
        ValueError, match=re.escape("valid_lens must have shape [B]=[2] or [B, T]=[2, 3], got [3]")
    ):
        dot(q, k, v, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=re.escape("valid_lens must have shape [B]=[2]")):
        nnx.jit(lambda m, *a: m(*a))(dot, q, k, v, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(
        ValueError,
        match=re.escape("queries [2, 3, 4] and keys [2, 5, 7] must have the same feature size"),
    ):
        dot(q, _x(2, 5, 7), v)
    add = AdditiveAttention(key_size=7, query_size=4, num_hiddens=3, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=re.escape("expected queries [..., 4] and keys [..., 7], got [2, 3, 4] and [2, 5, 4]"),
    ):
        add(q, k, v)


def test_trace_time_not_run_time():
    """The checks fire on abstract values: nothing needs to be computed."""
    spec = jax.ShapeDtypeStruct((2, 4, 3, 8), np.float32)
    with pytest.raises(ValueError, match="N=3 must be a multiple"):
        jax.eval_shape(dpa, spec, KV, KV)
