"""Explicitly sharded inputs (``jax.make_mesh``'s default axis type) on 8 emulated CPU
devices: every attention path, the models and decoding give the unsharded results, with
the query's / tokens' sharding on the output (a separate process: the device count is
fixed when jax starts)."""

import json
import subprocess
import sys
import textwrap

import pytest
from _train_utils import ROOT, device_env

SCRIPT = textwrap.dedent(
    """
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jattn
    from jattn.functional import dispatch
    from jattn.functional.blocked import blocked_attention
    from jattn.models import DecoderLM, Transformer
    from jattn.models.seq2seq import BahdanauSeq2Seq

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    assert mesh.axis_types == (AxisType.Explicit, AxisType.Explicit)
    rng = np.random.default_rng(0)
    results = {}

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def compare(name, fn, args, specs):
        # fn under jit on sharded args vs fn on unsharded args; output specs recorded
        # ready before the next dispatch: the Pallas interpreter's callbacks dispatch JAX
        # operations, and other work dispatched meanwhile can deadlock the CPU runtime
        ref = jax.block_until_ready(jax.jit(fn)(*args))  # eager runs op by op: slower
        with jax.set_mesh(mesh):
            put = [a if s is None else jax.device_put(a, NamedSharding(mesh, s))
                   for a, s in zip(args, specs)]
            out = jax.block_until_ready(jax.jit(fn)(*put))
        err = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
                  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
        results[name] = {"err": err, "specs": [str(x.sharding.spec) for x in jax.tree.leaves(out)]}

    # attention: batch over 'data', heads over 'model'; T*S > 256^2 -> the blocked path
    q, k = normal(4, 272, 4, 8), normal(4, 272, 2, 8)
    lens = [272, 100, 7, 200]  # a list, as users write it
    bspec, hspec = P("data"), P("data", None, "model")
    compare("default", lambda q, k: jattn.dot_product_attention(q, k, k, is_causal=True),
            (q, k), (hspec, hspec))
    compare("default_grad", jax.grad(
        lambda q, k: jnp.sum(jattn.dot_product_attention(q, k, k, is_causal=True) ** 2),
        argnums=(0, 1)), (q, k), (hspec, hspec))
    compare("blocked_residual_lengths",
            lambda q, k: blocked_attention(q, k, k, key_value_seq_lengths=lens,
                                              return_residual=True, block_sizes=(64, 32)),
            (q, k), (bspec, bspec))

    # a decoding shape (one query, many keys): on CPU unsharded inputs take the dense
    # path's products in the keys' layout, which reshapes sharded axes; sharded inputs
    # keep the per-head products
    qd, kd = normal(4, 1, 4, 8), normal(4, 1024, 2, 8)
    assert dispatch.dense_in_layout(qd, kd)
    compare("decode", lambda q, k: jattn.dot_product_attention(q, k, k), (qd, kd),
            (hspec, hspec))

    # the Pallas TPU kernel, interpreted on CPU, through the dispatcher
    dispatch.pallas_attention = functools.partial(dispatch.pallas_attention, interpret=True)
    opts = dict(scale=None, is_causal=True, query_seq_lengths=None, key_value_seq_lengths=None,
                local_window_size=None, dropout_rate=0.0, dropout_rng=None,
                fully_masked="zeros", return_residual=False, return_weights=False)
    q1, k1 = normal(4, 128, 4, 8), normal(4, 128, 2, 8)
    pallas = lambda q, k: dispatch.run("pallas", q, k, k, **opts)
    compare("pallas", pallas, (q1, k1), (hspec, hspec))
    with jax.set_mesh(mesh):  # batch and heads sharded: one kernel per shard, no gather
        put = [jax.device_put(x, NamedSharding(mesh, hspec)) for x in (q1, k1)]
        results["pallas_gathers"] = "all-gather" in jax.jit(pallas).lower(*put).compile().as_text()

    # models: tokens sharded over 'data'
    src = jnp.asarray(rng.integers(3, 20, (4, 10)), jnp.int32)
    tgt = jnp.asarray(rng.integers(3, 20, (4, 9)), jnp.int32)
    plen = jnp.asarray([1, 10, 4, 6], jnp.int32)
    kw = dict(num_layers=1, features=16, num_heads=4, max_len=24, rngs=nnx.Rngs(0))
    model = Transformer(20, 20, **kw)
    compare("transformer", lambda s, t: model(s, t), (src, tgt), (bspec, bspec))
    compare("transformer_beam", lambda s: model.generate(s, max_len=6, beam_size=2), (src,),
            (bspec,))
    lm = DecoderLM(20, **kw)
    compare("lm_greedy", lambda s, l: lm.generate(s, l, max_new_tokens=5), (src, plen),
            (bspec, bspec))
    rnn = BahdanauSeq2Seq(20, 20, embed_dim=8, hidden=8, rngs=nnx.Rngs(0))
    compare("bahdanau", lambda s, t: rnn(s, t), (src, tgt), (bspec, bspec))
    compare("bahdanau_beam", lambda s: rnn.generate(s, max_len=5, beam_size=2), (src,), (bspec,))
    # learned latents / probes broadcast over the batch: split over it as the inputs are
    from jattn.layers import AttentionPoolingHead, PerceiverEncoder
    x, valid = normal(4, 10, 6), jnp.arange(10)[None] < jnp.asarray([10, 3, 7, 1])[:, None]
    perceiver = PerceiverEncoder(3, 8, 6, 2, 1, rngs=nnx.Rngs(0))
    compare("perceiver", lambda x, v: perceiver(x, input_mask=v), (x, valid), (bspec, bspec))
    head = AttentionPoolingHead(6, 2, rngs=nnx.Rngs(0))
    compare("pooling_head", lambda x, v: head(x, mask=v), (x, valid), (bspec, bspec))
    print(json.dumps(results))
    """
)


@pytest.mark.slow
def test_explicitly_sharded_inputs_give_the_unsharded_results():
    env = device_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("pallas_gathers") is False
    for name, r in results.items():
        assert r["err"] <= 1e-5, (name, r)
    head = "P('data', None, 'model', None)"
    batch = "P('data', None, None, None)"
    assert results["default"]["specs"] == [head]
    assert results["default_grad"]["specs"] == [head, head]
    assert results["blocked_residual_lengths"]["specs"] == [
        batch,
        "P('data', None, None)",
    ]
    assert results["pallas"]["specs"] == [head]
    assert results["decode"]["specs"] == [head]
    assert results["transformer"]["specs"] == ["P('data', None, None)"]
    assert results["perceiver"]["specs"] == ["P('data', None, None)"]
    assert results["pooling_head"]["specs"][0].startswith("P('data'")
    for name in ("transformer_beam", "lm_greedy", "bahdanau_beam"):
        assert results[name]["specs"] == ["P('data', None)"], name
