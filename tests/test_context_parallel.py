"""Context parallelism (jattn.functional.context) on 2, 4 and 8 emulated CPU devices: every
strategy and layout equals single-device attention in float64 (the dense path) for
outputs and gradients, with full, causal, windowed and segment masks and a score mod;
the dispatcher picks the ring for sequence-sharded inputs; bad calls get clear errors.
A separate process: the device count is fixed when jax starts.

Tolerances: forward 1e-6 of the output's size (max |out|, about 3 here; the
single-device float32 path itself is 4e-7 of it from float64 on these inputs),
gradients 1e-5 absolute, the ALiBi slopes' gradient (a sum over B*T*T terms) 1e-5
relative."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_utils import ROOT, device_env

import jattn
from jattn.functional import context

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    import jattn
    from jattn import mods
    from jattn.functional import dispatch

    rng = np.random.default_rng(0)
    B, T, N, K, H = 4, 48, 8, 2, 8  # T: a multiple of 2 * 8 (zigzag on 8 devices)
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, T, K, H))
    v = rng.standard_normal((B, T, K, H))
    ct = rng.standard_normal((B, T, N, H))  # the output's cotangent
    ids = np.sort(rng.integers(0, 3, (B, T)), axis=1)
    slopes = np.asarray(jattn.alibi_slopes(N), np.float64)  # the standard slopes

    def per_example(ids, b, n, q, kv):
        # example 0: causal, 1: a window, 2: packed documents (segment ids), 3: full
        causal, window = kv <= q, (q - kv <= 5) & (kv - q <= 2)
        seg = ids[b, q] == ids[b, kv]
        return jnp.where(b == 0, causal, jnp.where(b == 1, window, jnp.where(b == 2, seg, True)))

    def case(kind, ids):
        if kind == "masks":  # every mask of the issue in one call, and a score_mod
            return lambda sl: dict(mask_mod=mods.Mod(per_example, ids), score_mod=mods.alibi(sl))
        if kind == "dropout":  # the keep-mask drawn at global coordinates: dense's
            key = jax.random.key(3)
            return lambda sl: dict(is_causal=True, dropout_rate=0.3, dropout_rng=key,
                                   score_mod=mods.alibi(sl))
        if kind == "causal_lengths":
            lens = jnp.asarray([48, 30, 17, 1], jnp.int32)
            return lambda sl: dict(is_causal=True, query_seq_lengths=lens,
                                   key_value_seq_lengths=lens)
        return lambda sl: {}

    def run(fn, kind, q, k, v, ct, ids, sl, residual=False):
        # one trace: the output (and lse) ride along with the gradients
        opts = case(kind, ids)
        def loss(q, k, v, sl):
            res = fn(q, k, v, **opts(sl), return_residual=residual)
            out, lse = res if residual else (res, None)
            return jnp.sum(out * ct), (out, lse)
        grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        grads, (out, lse) = grad(q, k, v, sl)
        return out, grads, lse

    def reference(kind, residual=False, dtype=jnp.float64, kv=None):
        # single-device attention (the dense path) in float64, or float32 as the shards run
        dense = lambda q, k, v, **o: jattn.dot_product_attention(
            q, k, v, implementation="dense", **o)
        args = [jnp.asarray(x, dtype) for x in (q, *(kv or (k, v)), ct)]
        # compiled: a gradient run op by op is slower than its compile on these shapes
        return jax.jit(lambda *a: run(dense, kind, *a, residual=residual))(
            *args, jnp.asarray(ids), jnp.asarray(slopes, dtype))

    refs = {}
    results = {}

    def compare(name, fn, kind, devices, layout="contiguous", t=T, residual=False, kv=None):
        key = (kind, kv is None)
        if key not in refs:
            refs[key] = reference(kind, residual, jnp.float64, kv)
        ref_out, ref_grads, ref_lse = refs[key]
        mesh = jax.make_mesh((devices,), ("seq",), devices=jax.devices()[:devices])
        order = (jattn.zigzag_indices(t, devices) if layout == "zigzag" else np.arange(t))
        f32 = lambda x: jnp.asarray(x[:, order], jnp.float32)
        with jax.set_mesh(mesh):
            put = lambda x: jax.device_put(f32(x), NamedSharding(mesh, P(None, "seq")))
            args = [put(x) for x in (q, *(kv or (k, v)), ct)]
            # the mods see global positions: ids stay in the natural order
            cp = lambda q, k, v, **o: fn(q, k, v, layout=layout, **o)
            out, grads, lse = jax.jit(lambda *a: run(cp, kind, *a, residual=residual))(
                *args, jnp.asarray(ids, jnp.int32), jnp.asarray(slopes, jnp.float32))
        back = np.argsort(order)
        got = [np.asarray(out)[:, back]] + [np.asarray(g)[:, back] for g in grads[:3]]
        want = [np.asarray(ref_out)] + [np.asarray(g) for g in ref_grads[:3]]
        errs = [float(np.max(np.abs(a - b))) for a, b in zip(got, want)]
        # the slopes' gradient sums B*T*T terms: compared relative to its size
        rel = float(np.max(np.abs(np.asarray(grads[3]) - np.asarray(ref_grads[3])))
                    / max(float(np.max(np.abs(np.asarray(ref_grads[3])))), 1e-30))
        # forward errors relative to the output's size (float32 resolves ~1e-7 of it)
        scale = max(1.0, float(np.max(np.abs(want[0]))))
        r = {"out": errs[0] / scale, "grad": max(errs[1:]), "slopes_rel": rel,
             "spec": str(out.sharding.spec)}
        if residual:
            seen = np.asarray(ref_lse) > -1e30
            r["lse"] = float(np.max(np.abs(np.asarray(lse)[:, back] - np.asarray(ref_lse))[seen]))
        results[name] = r

    # the single-device float32 path's own error, for comparison
    one = reference("masks", dtype=jnp.float32)
    ref64 = reference("masks")
    results["one-device-f32"] = {
        "out": float(np.max(np.abs(np.asarray(one[0]) - np.asarray(ref64[0])))
                     / max(1.0, float(np.max(np.abs(np.asarray(ref64[0])))))),
        "grad": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(one[1][:3], ref64[1][:3])),
    }
    strategies = {"ring": jattn.ring_attention, "all_gather": jattn.all_gather_attention,
                  "ulysses": jattn.ulysses_attention}
    for name, layout, devices in MASKED_CASES:
        compare(f"{name}-{layout}-{devices}", strategies[name], "masks", devices, layout)
    for name, fn in strategies.items():
        compare(f"{name}-causal_lengths-4", fn, "causal_lengths", 4, residual=True)
    compare("ring-full-8", jattn.ring_attention, "full", 8)  # no mask: no block table
    # small tiles: many blocks per shard, empty and partial ones
    small = lambda q, k, v, **o: jattn.ring_attention(q, k, v, block_sizes=(4, 8), **o)
    compare("ring-small-blocks-zigzag-4", small, "masks", 4, "zigzag")
    # dropout: the same weights dropped as on one device
    compare("ring-dropout-zigzag-4", jattn.ring_attention, "dropout", 4, "zigzag")
    compare("ring-dropout-contiguous-8", jattn.ring_attention, "dropout", 8)
    # as many key/value heads as query heads: queries travel in the backward ring
    kv_mha = [rng.standard_normal((B, T, N, H)) for _ in range(2)]
    compare("ring-mha-zigzag-4", jattn.ring_attention, "masks", 4, "zigzag", kv=kv_mha)

    # T not a multiple of the devices (contiguous: padded, the padding hidden)
    t2 = 30
    q2, k2, v2 = (x[:, :t2] for x in (q, k, v))
    mesh = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4])
    lens = jnp.asarray([30, 11, 29, 2], jnp.int32)
    ref = jattn.dot_product_attention(q2, k2, v2, is_causal=True, key_value_seq_lengths=lens,
                                      implementation="dense")
    for name, fn in strategies.items():
        with jax.set_mesh(mesh):
            out = jax.jit(lambda q, k, v: fn(q, k, v, is_causal=True, key_value_seq_lengths=lens))(
                *(jnp.asarray(x, jnp.float32) for x in (q2, k2, v2)))
        err = float(np.max(np.abs(np.asarray(out) - ref)) / max(1.0, np.max(np.abs(ref))))
        results[f"{name}-uneven-4"] = {"out": err}
    errors = {}
    try:
        with jax.set_mesh(mesh):
            jattn.ring_attention(*(jnp.asarray(x, jnp.float32) for x in (q2, k2, v2)),
                                 layout="zigzag")
    except ValueError as e:
        errors["zigzag_uneven"] = str(e)
    try:
        with jax.set_mesh(mesh):
            jattn.ulysses_attention(*(jnp.asarray(x, jnp.float32)[:, :, :2] for x in (q, k, v)))
    except ValueError as e:
        errors["ulysses_heads"] = str(e)
    results["errors"] = errors

    # the dispatcher: sequence-sharded inputs over an explicit axis run the ring; with
    # the batch over 'data' and the sequence over 'seq', and under the attention layer
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    spec = P("data", "seq")
    a32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    ref = jattn.dot_product_attention(*a32, is_causal=True, implementation="dense")
    with jax.set_mesh(mesh):
        put = [jax.device_put(x, NamedSharding(mesh, spec)) for x in a32]
        chosen = dispatch.select(None, *put, is_causal=True)
        hlo = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True)
                      ).lower(*put).compile().as_text()
        out = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True))(*put)
    err = float(np.max(np.abs(np.asarray(out) - ref)) / max(1.0, float(np.max(np.abs(ref)))))
    # a key padding mask array [B, 1, 1, S] (as the models pass) is a mask over keys
    valid = np.array([48, 20, 33, 5])[:, None, None, None]
    pad = jnp.asarray(np.arange(T)[None, None, None, :] < valid)
    ref_pad = jattn.dot_product_attention(*a32, mask=pad, implementation="dense")
    with jax.set_mesh(mesh):
        out_pad = jax.jit(lambda q, k, v, m: jattn.dot_product_attention(q, k, v, mask=m))(
            *put, pad)
    results["key_mask"] = float(np.max(np.abs(np.asarray(out_pad) - ref_pad)))
    # a decoder LM on tokens sharded along the sequence: its attention runs the ring
    from flax import nnx
    from jattn.models import DecoderLM
    lm = DecoderLM(20, num_layers=1, features=16, num_heads=4, max_len=64, rngs=nnx.Rngs(0))
    tok = jnp.asarray(rng.integers(3, 20, (4, T)), jnp.int32)
    ref_lm = lm(tok)
    with jax.set_mesh(mesh):
        ts = jax.device_put(tok, NamedSharding(mesh, spec))
        out_lm = nnx.jit(lambda m, t: m(t))(lm, ts)
        lm_hlo = jax.jit(lambda t: lm(t)).lower(ts).compile().as_text()
    results["lm"] = {"out": float(np.max(np.abs(np.asarray(out_lm) - ref_lm))),
                     "spec": str(out_lm.sharding.spec),
                     "collective_permute": "collective-permute" in lm_hlo}
    # NaN at the end (a decoder's padding) and a loss without the rows that see it: on 4
    # shards most pairs are clean, and their rows that saw the NaN on another shard
    # (a NaN max) are skipped too, so the gradients are the dense path's
    mesh4 = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4])
    bad = [a32[0]] + [x.at[:, 40:].set(jnp.nan) for x in a32[1:]]  # keys and values
    keep = jnp.asarray((np.arange(T) < 40)[None, :, None, None])
    w = jnp.asarray(ct, jnp.float32)
    def tail_grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.where(keep, fn(q, k, v), 0.0) * w)
        return jax.jit(jax.grad(loss, (0, 1, 2)))(*bad)
    with jax.set_mesh(mesh4):
        ring_g = tail_grads(lambda q, k, v: jattn.ring_attention(q, k, v, is_causal=True))
    dense_g = tail_grads(lambda q, k, v: jattn.dot_product_attention(
        q, k, v, is_causal=True, implementation="dense"))
    results["nan_tail"] = {
        "finite": all(bool(np.isfinite(np.asarray(g)).all()) for g in ring_g),
        "err": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(ring_g, dense_g)),
    }
    results["dispatch"] = {"chosen": chosen, "out": err,
                           "spec": str(out.sharding.spec),
                           "collective_permute": "collective-permute" in hlo,
                           "all_gather": "all-gather" in hlo}
    print("RESULT " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def results():
    env = device_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", f"MASKED_CASES = {MASKED_CASES!r}\n" + SCRIPT], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


STRATEGIES = ("ring", "all_gather", "ulysses")
# Each strategy and layout under every mask and a score mod: the ring (a block table per
# pair of shards, which changes with the device count) on 2, 4 and 8 devices, each layout
# (contiguous on 8 and zigzag on 4 also run below: no mask, dropout, small blocks, as many
# kv heads as queries); the others (one gather or all-to-all) on each count and layout once.
MASKED_CASES = [("ring", "zigzag", 2), ("ring", "contiguous", 4), ("ring", "zigzag", 8)]
MASKED_CASES += [
    (name, layout, p)
    for name in STRATEGIES[1:]
    for layout, p in (("zigzag", 2), ("contiguous", 4), ("zigzag", 8))
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, layout, devices", MASKED_CASES)
def test_every_strategy_equals_one_device(results, strategy, layout, devices):
    r = results[f"{strategy}-{layout}-{devices}"]
    assert r["out"] <= 1e-6, r
    assert r["grad"] <= 1e-5, r
    assert r["slopes_rel"] <= 1e-5, r
    assert r["spec"] == "P(None, 'seq', None, None)", r


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lengths_full_and_uneven(results, strategy):
    r = results[f"{strategy}-causal_lengths-4"]
    assert max(r["out"], r["lse"]) <= 1e-6 and r["grad"] <= 1e-5, r
    if strategy == "ring":
        r = results["ring-full-8"]
        assert r["out"] <= 1e-6 and r["grad"] <= 1e-5, r
    assert results[f"{strategy}-uneven-4"]["out"] <= 1e-6


@pytest.mark.slow
def test_small_blocks_mha_and_errors(results):
    assert results["one-device-f32"]["out"] <= 1e-6  # the measure is float32's
    for name in ("ring-small-blocks-zigzag-4", "ring-mha-zigzag-4", "ring-dropout-zigzag-4",
                 "ring-dropout-contiguous-8"):  # fmt: skip
        r = results[name]
        assert r["out"] <= 1e-6 and r["grad"] <= 1e-5 and r["slopes_rel"] <= 1e-5, r
    errors = results["errors"]
    assert "T and S multiples of 2 * 4 devices = 8, got T=30, S=30" in errors["zigzag_uneven"]
    assert "N=2 query heads per device a multiple of 4" in errors["ulysses_heads"]


@pytest.mark.slow
def test_sequence_sharded_inputs_run_the_ring(results):
    r = results["dispatch"]
    assert r["chosen"] == "ring"
    assert r["out"] <= 1e-6
    assert r["spec"] == "P('data', 'seq', None, None)"
    assert r["collective_permute"] and not r["all_gather"]
    assert results["key_mask"] <= 1e-6
    lm = results["lm"]
    assert lm["out"] <= 1e-5 and lm["collective_permute"], lm
    assert lm["spec"] == "P('data', 'seq', None)", lm


@pytest.mark.slow
def test_ring_gradients_without_the_rows_that_see_a_nan(results):
    """A NaN at the end (a decoder's padding, outside the causal view of the real rows)
    and a loss without the rows that see it: the ring's gradients were NaN, a row that
    saw the NaN on one shard having a NaN max in the pairs of the others; now they are
    finite and the dense path's."""
    r = results["nan_tail"]
    assert r["finite"] and r["err"] <= 1e-5, r


# ---------------------------------------------------------------------- in this process


def test_zigzag_order_round_trips():
    assert context.zigzag_indices(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    order = context.zigzag_indices(24, 3)
    assert sorted(order.tolist()) == list(range(24))
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    z = jattn.to_zigzag(x, 3)
    np.testing.assert_array_equal(z, np.asarray(x)[:, order])
    np.testing.assert_array_equal(jattn.from_zigzag(z, 3), x)
    # causal work is balanced: each device's chunks hold the same number of visible pairs
    t, p = 64, 4
    shards = context.zigzag_indices(t, p).reshape(p, t // p)
    work = [sum(int(i) + 1 for i in shards[d]) for d in range(p)]
    assert max(work) == min(work), work


def test_zigzag_needs_chunks():
    with pytest.raises(ValueError, match="length 30 is not a multiple of 8"):
        context.zigzag_indices(30, 4)
    with pytest.raises(ValueError, match="axis must be an int in"):
        jattn.to_zigzag(jnp.zeros((2, 8)), 2, axis=2)


def _one_device():
    return jax.make_mesh((1,), ("seq",), devices=jax.devices()[:1])


def test_one_device_ring_equals_dense():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 4)), jnp.float32) for _ in range(3))
    ref = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="dense")
    out = jattn.ring_attention(q, k, v, mesh=_one_device(), is_causal=True, block_sizes=(4, 4))
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_eager_context_parallel_calls_are_one_cached_program():
    """Eagerly, each strategy runs as one compiled program (op by op, a shard_map's
    body takes seconds a call): a repeat or new lengths compile nothing, a lambda
    mask_mod compiles at its first call (no op-by-op first sight), and each result
    equals the jitted call's."""
    from jattn.functional._eager import _jitted as run

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 2, 3)), jnp.float32) for _ in range(3))
    mesh = _one_device()
    for fn in (jattn.ring_attention, jattn.all_gather_attention, jattn.ulysses_attention):
        options = dict(mesh=mesh, is_causal=True)
        before = run._cache_size()
        got = fn(q, k, v, key_value_seq_lengths=jnp.array([12, 5]), **options)
        fn(q, k, v, key_value_seq_lengths=jnp.array([7, 9]), **options)
        assert run._cache_size() == before + 1, fn.__name__
        fn(q, k, v, mask_mod=lambda b, n, i, j: i >= j, **options)
        assert run._cache_size() == before + 2, fn.__name__
        jitted = jax.jit(lambda q, k, v, lens, fn=fn, o=options: fn(
            q, k, v, key_value_seq_lengths=lens, **o))  # fmt: skip
        want = jitted(q, k, v, jnp.array([12, 5]))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=fn.__name__)


def test_one_device_ring_hides_non_finite_inputs():
    """NaN and inf keys and values past the key lengths reach no output and no gradient
    (both equal the dense path's, which hides them too); a NaN key that rows see makes
    exactly those rows NaN. The ring's pairs skip the NaN pairs' select while every
    input is finite (``_finite.guarded_by_flags``): the second case takes the other branch."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 4)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray([12, 9])
    k = k.at[0, 12:].set(jnp.nan).at[1, 10, 1, 2].set(jnp.inf)
    v = v.at[0, 13:].set(jnp.inf).at[1, 9:].set(jnp.nan)
    options = dict(is_causal=True, key_value_seq_lengths=lengths)
    mesh = _one_device()

    @jax.jit
    def ring(q, k, v):  # sharded over the mesh's "seq" axis (one device here)
        return jattn.ring_attention(q, k, v, mesh=mesh, block_sizes=(4, 4), **options)

    @jax.jit
    def dense(q, k, v):
        return jattn.dot_product_attention(q, k, v, implementation="dense", **options)

    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for fn in (ring, dense):
        out = fn(q, k, v)
        assert np.isfinite(out).all()
    np.testing.assert_allclose(ring(q, k, v), dense(q, k, v), atol=1e-6)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), (0, 1, 2))(q, k, v) for f in (ring, dense)
    ]
    for got, want in zip(*grads, strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=1e-5)
    seen = k.at[0, 3, 0, 1].set(jnp.nan)  # seen by example 0's rows 3.. of head 0
    out, want = np.asarray(ring(q, seen, v)), np.asarray(dense(q, seen, v))
    nan_rows = np.zeros((2, 16, 2), bool)
    nan_rows[0, 3:, 0] = True
    np.testing.assert_array_equal(np.isnan(out).any(-1), nan_rows)
    np.testing.assert_array_equal(np.isnan(want).any(-1), nan_rows)
    np.testing.assert_allclose(out[~nan_rows], want[~nan_rows], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layout="diagonal"), "layout must be one of ('contiguous', 'zigzag')"),
        (dict(axis_name="model"), "axis_name='model' is not an axis of the mesh ('seq',)"),
        (dict(implementation="ring"), "implementation must be a single-device path"),
        *[  # each was an error from inside (ZeroDivisionError, IndexError, pad_width)
            (
                dict(block_sizes=b),
                f"ring_attention: block_sizes must be a pair of positive ints, got {b!r}",
            )
            for b in [(0, 2), (2,), "big", (2.0, 2), (-1, 4)]
        ],
    ],
)
def test_bad_calls_are_named(kwargs, message):
    q = jnp.zeros((1, 8, 2, 4))
    fn = jattn.all_gather_attention if "implementation" in kwargs else jattn.ring_attention
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fn(q, q, q, mesh=_one_device(), **kwargs)


def test_unsupported_options_are_named():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(
        ValueError,
        match=r"'ring'\) does not take fully_masked='uniform' \(fully masked rows give zeros\)",
    ):
        jattn.dot_product_attention(q, q, q, implementation="ring", fully_masked="uniform")
    with pytest.raises(ValueError, match="needs a mesh: pass mesh= and axis_name="):
        jattn.ring_attention(q, q, q)
    # through dot_product_attention: a bias is not taken by the context-parallel paths
    with pytest.raises(ValueError, match=r"implementation='ring'\) does not take a bias"):
        jattn.dot_product_attention(q, q, q, jnp.zeros((8, 8)), implementation="ring")
    # dropout is the ring's alone
    with pytest.raises(ValueError, match=r"'all_gather'\) does not take dropout"):
        jattn.dot_product_attention(q, q, q, implementation="all_gather", dropout_rate=0.1,
                                    dropout_rng=jax.random.key(0))  # fmt: skip
    # nor a mask array over queries and keys (a key or query mask is taken)
    with pytest.raises(ValueError, match=r"varies along both queries and keys \(shape \[8, 8\]\)"):
        jattn.dot_product_attention(q, q, q, mask=jnp.ones((8, 8), bool), implementation="ring")
