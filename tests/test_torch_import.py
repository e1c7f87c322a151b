"""Weights from PyTorch reproduce PyTorch's outputs.

The fixtures come from tests/fixtures/make_torch_fixtures.py.

torch is not needed here: the fixtures hold the state dicts, inputs, masks (torch
conventions) and torch 2.13 CPU outputs as NumPy arrays.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jattn.interop import (
    load_multihead_attention,
    load_transformer,
    load_transformer_decoder_layer,
    load_transformer_encoder,
    load_transformer_encoder_layer,
    torch_masks_to_jattn,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch"
ATOL = 1e-5  # the bar: torch's outputs to 1e-5
NUM_HEADS = 4
TAGS = [(False, "relu"), (False, "gelu"), (True, "relu"), (True, "gelu")]


def load_fixture(name):
    """``(state_dict, inputs, outputs, meta)`` of ``tests/fixtures/torch/NAME.npz``."""
    with np.load(FIXTURES / f"{name}.npz") as f:
        parts = {"sd": {}, "in": {}, "out": {}}
        for key in f.files:
            if key != "meta":
                kind, sub = key.split("/", 1)
                parts[kind][sub] = f[key]
        meta = json.loads(str(f["meta"]))
    assert meta["torch_version"].startswith("2.13.0")
    return parts["sd"], parts["in"], parts["out"], meta


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), expected, atol=ATOL, rtol=0)


def tag(norm_first, activation):
    return f"{'pre' if norm_first else 'post'}_{activation}"


# --- nn.MultiheadAttention ---------------------------------------------------------------


def test_mha_packed_self_attention_and_averaged_weights():
    sd, x, y, meta = load_fixture("mha_packed")
    mha = load_multihead_attention(sd, num_heads=meta["num_heads"])
    assert (mha.num_heads, mha.head_dim) == (4, 4)
    out, weights = mha(x["x"], return_weights=True)  # weights [B, N, T, S]
    close(out, y["self_out"])
    close(np.asarray(weights).mean(axis=1), y["self_weights_avg"])


def test_mha_packed_bool_masks_and_per_head_weights():
    sd, x, y, _ = load_fixture("mha_packed")
    mha = load_multihead_attention(sd, num_heads=NUM_HEADS)
    mask, bias = torch_masks_to_jattn(x["key_padding_mask_bool"], x["attn_mask_bool"])
    assert bias is None and mask.shape == (2, 1, 4, 5)
    out, weights = mha(x["x"], x["memory"], mask=mask, return_weights=True)
    close(out, y["bool_out"])
    close(weights, y["bool_weights_per_head"])
    # The blocked positions really carry zero weight (torch True = blocked).
    assert np.all(np.asarray(weights)[1, :, :, 3:] == 0)


def test_mha_packed_float_masks_become_bias():
    sd, x, y, _ = load_fixture("mha_packed")
    mha = load_multihead_attention(sd, num_heads=NUM_HEADS)
    mask, bias = torch_masks_to_jattn(
        x["key_padding_mask_float"], x["attn_mask_float3"], num_heads=NUM_HEADS
    )
    assert mask.all() and bias.shape == (2, 4, 4, 5)
    out, weights = mha(x["x"], x["memory"], mask=mask, bias=bias, return_weights=True)
    close(out, y["float_out"])
    close(np.asarray(weights).mean(axis=1), y["float_weights_avg"])


def test_mha_packed_fast_path_output():
    sd, x, y, _ = load_fixture("mha_packed")
    mha = load_multihead_attention(sd, num_heads=NUM_HEADS)
    mask, _ = torch_masks_to_jattn(x["key_padding_mask_bool"])
    close(mha(x["memory"], mask=mask), y["fast_out"])


def test_mha_separate_projections_sequence_first():
    sd, x, y, meta = load_fixture("mha_separate_seq_first")
    assert "in_proj_weight" not in sd and not meta["batch_first"]
    mha = load_multihead_attention(sd, num_heads=NUM_HEADS)
    assert (mha.key.in_features[0], mha.value.in_features[0]) == (12, 8)
    mask, bias = torch_masks_to_jattn(x["key_padding_mask_bool"], x["attn_mask_float"])
    assert bias is not None  # the finite -1.5 entry
    q, k, v = (np.swapaxes(x[n], 0, 1) for n in ("query", "key", "value"))  # [L, B, .] -> [B, L, .]
    out, weights = mha(q, k, v, mask=mask, bias=bias, return_weights=True)
    close(np.swapaxes(np.asarray(out), 0, 1), y["out"])
    close(weights, y["weights_per_head"])
    close(np.asarray(weights).mean(axis=1), y["weights_avg"])


def test_mha_without_biases_and_causal_float_mask():
    sd, x, y, _ = load_fixture("mha_nobias")
    mha = load_multihead_attention(sd, num_heads=NUM_HEADS)
    assert mha.query.bias is None and mha.out.bias is None
    t = x["x"].shape[1]
    causal = np.triu(np.full((t, t), -np.inf, np.float32), k=1)  # generate_square_subsequent_mask
    mask, bias = torch_masks_to_jattn(attn_mask=causal)
    assert bias is None
    out, weights = mha(x["x"], mask=mask, return_weights=True)
    close(out, y["out"])
    close(np.asarray(weights).mean(axis=1), y["weights_avg"])
    close(mha(x["x"], is_causal=True), y["out"])


# --- nn.TransformerEncoderLayer / nn.TransformerDecoderLayer -------------------------------


@pytest.mark.parametrize("norm_first,activation", TAGS)
def test_encoder_layer(norm_first, activation):
    sd, x, y, meta = load_fixture(f"encoder_layer_{tag(norm_first, activation)}")
    assert (meta["norm_first"], meta["activation"]) == (norm_first, activation)
    block = load_transformer_encoder_layer(
        sd, num_heads=NUM_HEADS, norm_first=norm_first, activation=activation
    )
    assert block.pre_norm is norm_first and block.mlp.linear1.kernel[...].shape == (16, 32)
    mask, _ = torch_masks_to_jattn(x["src_key_padding_mask"])
    close(block(x["src"], mask=mask), y["out"])
    close(block(x["src"]), y["out_nomask"])


@pytest.mark.parametrize("norm_first,activation", TAGS)
def test_decoder_layer(norm_first, activation):
    sd, x, y, _ = load_fixture(f"decoder_layer_{tag(norm_first, activation)}")
    block = load_transformer_decoder_layer(
        sd, num_heads=NUM_HEADS, norm_first=norm_first, activation=activation
    )
    # torch's float causal tgt_mask and boolean padding masks, converted.
    self_mask, self_bias = torch_masks_to_jattn(x["tgt_key_padding_mask"], x["tgt_mask"])
    cross_mask, _ = torch_masks_to_jattn(x["memory_key_padding_mask"])
    assert self_bias is None
    out = block(x["tgt"], x["memory"], self_mask=self_mask, cross_mask=cross_mask, is_causal=False)
    close(out, y["out"])
    close(block(x["tgt"], x["memory"], is_causal=True), y["out_causal"])


# --- nn.Transformer ------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer(norm_first, activation):
    sd, x, y, meta = load_fixture(f"transformer_{tag(norm_first, activation)}")
    encoder, decoder = load_transformer(
        sd, num_heads=meta["nhead"], norm_first=norm_first, activation=activation
    )
    assert len(encoder.layers) == len(decoder.layers) == 2
    assert encoder.norm is not None and decoder.norm is not None
    src_mask, _ = torch_masks_to_jattn(x["src_key_padding_mask"])
    tgt_mask, _ = torch_masks_to_jattn(x["tgt_key_padding_mask"])
    memory = encoder(x["src"], mask=src_mask)
    out = decoder(x["tgt"], memory, self_mask=tgt_mask, cross_mask=src_mask, is_causal=True)
    close(out, y["out"])
    close(encoder(x["src"]), y["memory_nomask"])


def test_transformer_encoder_alone():
    sd, x, y, _ = load_fixture("transformer_post_relu")
    encoder_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    encoder = load_transformer_encoder(
        encoder_sd, num_heads=NUM_HEADS, norm_first=False, activation="relu"
    )
    close(encoder(x["src"]), y["memory_nomask"])
    del encoder_sd["norm.weight"], encoder_sd["norm.bias"]  # nn.TransformerEncoder(norm=None)
    encoder = load_transformer_encoder(
        encoder_sd, num_heads=NUM_HEADS, norm_first=False, activation="relu"
    )
    assert encoder.norm is None


# --- mask conversion -----------------------------------------------------------------------


def test_masks_hand_computed():
    kpm = np.array([[False, False, True], [False, True, True]])  # torch: True = padded
    attn = np.array([[0.0, -np.inf, 0.5], [0.0, 0.0, 0.0]], np.float32)  # [T=2, S=3]
    mask, bias = torch_masks_to_jattn(kpm, attn)
    expected_mask = np.array(
        [[[[1, 0, 0], [1, 1, 0]]], [[[1, 0, 0], [1, 0, 0]]]], bool
    )  # [B, 1, T, S]
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(bias, [[[[0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]]])
    assert torch_masks_to_jattn() == (None, None)
    float_kpm = np.array([[0.0, -2.0, -np.inf]], np.float32)
    mask, bias = torch_masks_to_jattn(float_kpm)
    np.testing.assert_array_equal(mask, [[[[True, True, False]]]])
    np.testing.assert_array_equal(bias, [[[[0.0, -2.0, 0.0]]]])


def test_mask_errors():
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, S\], got \[3\]"):
        torch_masks_to_jattn(np.zeros(3, bool))
    with pytest.raises(ValueError, match=r"3-D attn_mask \[8, 4, 5\] is \[B \* N, T, S\]"):
        torch_masks_to_jattn(attn_mask=np.zeros((8, 4, 5), bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \[T, S\]"):
        torch_masks_to_jattn(attn_mask=np.zeros((1, 2, 4, 5), bool))
    with pytest.raises(ValueError, match="disagree on the key length S"):
        torch_masks_to_jattn(np.zeros((2, 5), bool), np.zeros((4, 6), bool))
    with pytest.raises(ValueError, match=r"is for B=2 but the 3-D attn_mask \[6, 4, 5\]"):
        torch_masks_to_jattn(np.zeros((2, 5), bool), np.zeros((6, 4, 5), bool), num_heads=2)
    with pytest.raises(TypeError, match="must be boolean or float"):
        torch_masks_to_jattn(np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match=r"contains NaN or \+inf"):
        torch_masks_to_jattn(attn_mask=np.array([[0.0, np.nan]], np.float32))


def test_bfloat16_and_float64_values_keep_their_meaning():
    """bfloat16 state dicts and masks were refused ("must be a float array"); a finite
    float64 mask entry or weight past float32's range became -inf/inf without a word (a
    visible key with an -inf logit: zeros where torch averages the values)."""
    from jax.numpy import bfloat16

    sd, x, _, meta = load_fixture("mha_packed")
    bf16 = {k: v.astype(bfloat16) for k, v in sd.items()}
    exact = {k: v.astype(np.float32) for k, v in bf16.items()}  # the same values
    got = load_multihead_attention(bf16, num_heads=meta["num_heads"])(x["x"])
    want = load_multihead_attention(exact, num_heads=meta["num_heads"])(x["x"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    mask, bias = torch_masks_to_jattn(attn_mask=np.array([[0.0, -2.0]], bfloat16))
    np.testing.assert_array_equal(bias, [[[[0.0, -2.0]]]])
    lowest = np.finfo(np.float64).min
    mask, bias = torch_masks_to_jattn(attn_mask=np.array([[lowest, lowest, -np.inf]]))
    assert mask.tolist() == [[[[True, True, False]]]] and np.isfinite(bias).all()
    big = {**sd, "out_proj.weight": sd["out_proj.weight"].astype(np.float64) * 1e300}
    message = r"'out_proj.weight' holds finite values beyond float32's range \(largest "
    with pytest.raises(ValueError, match=message + r"magnitude .*\): as float32 they would be inf"):
        load_multihead_attention(big, num_heads=meta["num_heads"])


# --- state dict errors ---------------------------------------------------------------------


def test_missing_key_is_named():
    sd, *_ = load_fixture("encoder_layer_post_relu")
    del sd["linear2.bias"]
    with pytest.raises(ValueError, match=r"nn.TransformerEncoderLayer: state dict has no key "
                       r"'linear2.bias'; keys under 'linear2.': \['linear2.weight'\]"):  # fmt: skip
        load_transformer_encoder_layer(sd, num_heads=4, norm_first=False, activation="relu")


def test_wrong_shape_is_named():
    sd, *_ = load_fixture("decoder_layer_pre_gelu")
    sd["multihead_attn.out_proj.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match=r"'multihead_attn.out_proj.weight' has shape \[16, 8\], "
                       r"expected \[16, 16\]"):  # fmt: skip
        load_transformer_decoder_layer(sd, num_heads=4, norm_first=True, activation="gelu")
    sd, *_ = load_fixture("mha_packed")
    sd["in_proj_weight"] = np.zeros((47, 16), np.float32)
    with pytest.raises(ValueError, match=r"'in_proj_weight' has shape \[47, 16\], expected "
                       r"\[3 \* embed_dim, embed_dim\]"):  # fmt: skip
        load_multihead_attention(sd, num_heads=4)


def test_extra_key_and_bad_options():
    sd, *_ = load_fixture("mha_packed")
    with pytest.raises(ValueError, match=r"unexpected keys in the state dict: \['extra.weight'\]"):
        load_multihead_attention({**sd, "extra.weight": np.zeros(3, np.float32)}, num_heads=4)
    with pytest.raises(ValueError, match="embed_dim=16 .* not divisible by num_heads=3"):
        load_multihead_attention(sd, num_heads=3)
    with pytest.raises(ValueError, match="add_bias_kv=True"):
        load_multihead_attention({**sd, "bias_k": np.zeros((1, 1, 16), np.float32)}, num_heads=4)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_multihead_attention([1, 2], num_heads=4)
    sd, *_ = load_fixture("transformer_post_relu")
    with pytest.raises(TypeError, match="norm_first must be a bool"):
        load_transformer(sd, num_heads=4, norm_first="yes", activation="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        load_transformer(sd, num_heads=4, norm_first=False, activation="silu")
    del sd["decoder.layers.1.norm3.weight"]
    with pytest.raises(ValueError, match=r"nn.Transformer: state dict has no key "
                       r"'decoder.layers.1.norm3.weight'"):  # fmt: skip
        load_transformer(sd, num_heads=4, norm_first=False, activation="relu")


def test_inconsistent_sizes_are_named():
    sd, *_ = load_fixture("transformer_post_relu")
    bad = dict(sd, **{"encoder.layers.1.self_attn.in_proj_weight": np.zeros((96, 32), np.float32)})
    with pytest.raises(ValueError, match=r"encoder.layers.1.self_attn. has embed_dim=32, kdim=32, "
                       r"vdim=32; the jattn layer has qkv width 16"):  # fmt: skip
        load_transformer(bad, num_heads=4, norm_first=False, activation="relu")
    bad = dict(sd, **{"encoder.layers.0.linear1.weight": np.zeros((32, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'encoder.layers.0.linear1.weight' has shape \[32, 8\], "
                       r"expected \[dim_feedforward, 16\]"):  # fmt: skip
        load_transformer(bad, num_heads=4, norm_first=False, activation="relu")
    bad = {k: v for k, v in sd.items() if not k.startswith("decoder.layers.0.")}
    with pytest.raises(ValueError, match=r"layer indices under 'decoder.layers.' are \[1\]"):
        load_transformer(bad, num_heads=4, norm_first=False, activation="relu")
    bad = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    with pytest.raises(ValueError, match=r"no keys 'decoder.layers.0.'"):
        load_transformer(bad, num_heads=4, norm_first=False, activation="relu")
    bad = dict(sd, **{"encoder.norm.bias": np.zeros(16, np.int32)})
    with pytest.raises(TypeError, match=r"'encoder.norm.bias' must be a float array"):
        load_transformer(bad, num_heads=4, norm_first=False, activation="relu")


def test_separate_projection_errors():
    sd, *_ = load_fixture("mha_separate_seq_first")
    with pytest.raises(ValueError, match=r"'q_proj_weight' has shape \[16\], expected "
                       r"\[embed_dim, embed_dim\]"):  # fmt: skip
        load_multihead_attention({**sd, "q_proj_weight": np.zeros(16, np.float32)}, num_heads=4)
    bad = {**sd, "k_proj_weight": np.zeros((8, 12), np.float32)}  # rows must be embed_dim
    with pytest.raises(ValueError, match=r"'k_proj_weight' has shape \[8, 12\], expected "
                       r"\[16, 12\]"):  # fmt: skip
        load_multihead_attention(bad, num_heads=4)
    bad = {**sd, "k_proj_weight": np.zeros((), np.float32)}  # was an IndexError
    with pytest.raises(ValueError, match=r"'k_proj_weight' has shape \[\], expected "
                       r"\[embed_dim, kdim\]"):  # fmt: skip
        load_multihead_attention(bad, num_heads=4)
    layer_sd, *_ = load_fixture("encoder_layer_post_relu")
    layer_sd = {k: v for k, v in layer_sd.items() if k != "self_attn.in_proj_weight"}
    layer_sd.update({f"self_attn.{c}_proj_weight": sd[f"{c}_proj_weight"] for c in "qkv"})
    with pytest.raises(ValueError, match="self_attn must be a packed nn.MultiheadAttention"):
        load_transformer_encoder_layer(layer_sd, num_heads=4, norm_first=False, activation="relu")
