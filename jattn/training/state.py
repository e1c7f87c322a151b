"""Train state as a pure pytree and the one jit-compiled train step."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jattn.training.losses import masked_cross_entropy
from jattn.training.metrics import token_accuracy_counts
from jattn.training.parallel import batch_sharding, replicated

__all__ = [
    "COUNTED",
    "PAD_LABEL",
    "TrainState",
    "create_train_state",
    "forward_loss",
    "make_eval_step",
    "make_train_step",
]


class TrainState(NamedTuple):
    """Everything a resumed run needs, as arrays.

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: the model's ``nnx.Param`` state.
      rest: the model's other state (e.g. RNG streams), carried through the step.
      opt_state: the optax state.
      rng: the base PRNG key (uint32 ``[2]``); step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array):
    """Splits ``model`` into ``(graphdef, TrainState)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), rng)
    return graphdef, state


#: What a training step counts, by kind of task: the accuracy's denominator.
COUNTED = {"seq2seq": "tokens", "classification": "examples", "detection": "objects"}
#: Classification labels of padding rows (evaluation batches are filled up with them).
PAD_LABEL = -1


def forward_loss(kind: str, model, batch, *, label_smoothing: float, pad_id: int, **call):
    """``(loss, count, correct, logits)`` of ``model`` on ``batch``: the mean
    cross-entropy, how many predictions it averages, how many of them are right (argmax).

    ``kind='seq2seq'``: ``model(src, tgt_in, **call)`` scored against ``tgt`` (padding
    ``pad_id`` left out). ``kind='classification'``: ``model(**inputs, **call)`` with the
    batch's other arrays as keyword arguments (``images=``), scored against ``label``
    (``PAD_LABEL`` rows left out). ``kind='detection'``: ``model(images, **call) ->
    (class_logits, boxes)`` scored by DETR's set loss against ``boxes`` and ``classes``
    (:func:`jattn.training.detection.set_loss`; ``label_smoothing`` unused: the training
    program refuses it for detection), counting
    the objects and the matched queries of the right class; ``logits`` is the pair.
    """
    if kind == "classification":
        inputs = {k: v for k, v in batch.items() if k != "label"}
        logits = model(**inputs, **call)
        labels, pad_id = batch["label"][:, None], PAD_LABEL
        scored = logits[:, None]
    elif kind == "detection":
        from jattn.training.detection import set_loss

        class_logits, boxes = model(batch["images"], **call)
        loss, parts = set_loss(class_logits, boxes, batch["boxes"], batch["classes"])
        real = batch["classes"] >= 0
        picked = jnp.take_along_axis(class_logits, jnp.maximum(parts["matched"], 0)[..., None], 1)
        correct = jnp.sum((jnp.argmax(picked, axis=-1) == batch["classes"]) & real)
        return loss, jnp.sum(real).astype(jnp.float32), correct, (class_logits, boxes)
    elif kind == "seq2seq":
        logits = scored = model(batch["src"], batch["tgt_in"], **call)
        labels = batch["tgt"]
    else:
        raise ValueError(f"unknown kind of task {kind!r}; expected one of {sorted(COUNTED)}")
    loss, count = masked_cross_entropy(
        scored, labels, label_smoothing=label_smoothing, pad_id=pad_id
    )
    correct, _ = token_accuracy_counts(scored, labels, pad_id=pad_id)
    return loss, count, correct, logits


@functools.lru_cache(maxsize=16)
def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float,
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    kind: str = "seq2seq",
):
    """The jit-compiled ``(state, batch, learning_rate) -> (state, metrics)``; ``state`` is
    donated. ``tx`` runs at unit learning rate (:func:`make_optimizer`); the updates are
    scaled by the scalar ``learning_rate``, an input so that schedules never recompile.

    Cached on its (hashable) arguments, so a second run with the same model and
    optimizer reuses the compiled step. For ``kind='seq2seq'`` ``batch`` holds
    ``src [B,S]``, ``tgt_in [B,T]`` and ``tgt [B,T]``; for ``kind='classification'`` the
    model's inputs by argument name (e.g. ``images [B,H,W,C]``) and ``label [B]``
    (:func:`forward_loss`). Dropout keys
    come from ``fold_in(state.rng, state.step)``, so a step is a pure function of
    the state and the batch.

    With a ``mesh`` (:func:`jattn.training.parallel.data_parallel_mesh`) the step is
    data parallel: the state (and the learning rate) replicated on every device, the
    batch split along its first axis, the outputs replicated.
    """

    def train_step(state: TrainState, batch, learning_rate):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.rest)
            loss, count, correct, _ = forward_loss(
                kind,
                model,
                batch,
                label_smoothing=label_smoothing,
                pad_id=pad_id,
                deterministic=False,
                rngs=nnx.Rngs(dropout=dropout_rng),
            )
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (count, correct, rest)

        (loss, (count, correct, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: learning_rate * u, updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": correct / jnp.maximum(count, 1.0),
            COUNTED[kind]: count,
            "grad_norm": optax.tree.norm(grads),
        }
        new_state = TrainState(state.step + 1, params, rest, opt_state, state.rng)
        return new_state, metrics

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(
        train_step, donate_argnums=0, in_shardings=(rep, data, rep), out_shardings=(rep, rep)
    )


@functools.lru_cache(maxsize=16)
def make_eval_step(
    graphdef,
    *,
    max_len: int,
    beam_size: int,
    length_penalty: float,
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    kind: str = "seq2seq",
):
    """The jit-compiled ``(params, rest, batch) -> (loss_sum, correct, count, predicted)``.

    Loss and accuracy sums (teacher-forced for ``kind='seq2seq'``) and what the model
    predicts: ``model.generate`` tokens ``[B, max_len]``, or for ``kind='classification'``
    the argmax class ``[B]`` (rows labelled -1 are padding, left out of the sums).
    With a ``mesh``, the batch (and ``predicted``) is split over its ``'data'`` axis.
    """

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, count, correct, logits = forward_loss(
            kind, model, batch, label_smoothing=0.0, pad_id=pad_id, deterministic=True
        )
        if kind == "classification":
            predicted = jnp.argmax(logits, axis=-1)
        elif kind == "detection":
            class_logits, boxes = logits
            predicted = (jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1), boxes)
        else:
            predicted = model.generate(
                batch["src"], max_len=max_len, beam_size=beam_size, length_penalty=length_penalty
            )
        return loss * count, correct, count, predicted

    if mesh is None:
        return jax.jit(eval_step)
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(rep, rep, data), out_shardings=(rep, rep, rep, data))
