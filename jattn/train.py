"""Train and evaluate a model on a built-in task: sequence to sequence, or classification.

    jattn-train --config dates --workdir /tmp/dates
    python -m jattn.train --config copy:small --workdir /tmp/copy --config.train.num_steps=100
    python -m jattn.train --config configs/dates.py --workdir /tmp/dates  # a config file
    jattn-train --config vit_digits --workdir /tmp/digits  # a ViT on scikit-learn's digits

``--config`` names a shipped config (``jattn-train --help`` lists them) or gives the path
of a config file, optionally with ``:arg`` for its ``get_config(arg)``. Running the same
command again resumes from the last checkpoint in ``workdir``; Ctrl-C or SIGTERM finishes
the current step, saves a checkpoint and exits. A loss that becomes NaN or infinite stops
the run with a ``FloatingPointError`` naming the step and the last good checkpoint.

``config.train.parallelism`` lays the run out over its devices: ``'data'`` (the default),
``'fsdp'``, ``'tensor'`` or ``'sequence'``, on a mesh of ``config.train.mesh_shape``
(:mod:`jattn.training.sharding`); a checkpoint resumes under any of them, also on another
number of devices. Several processes (hosts) run the same command with ``--coordinator_address``,
``--num_processes`` and ``--process_id``; process 0 writes the metrics, ``config.json``
and the plots.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from jattn.data import (
    BOS,
    CLASSIFICATION_TASKS,
    DETECTION_TASKS,
    EOS,
    PAD,
    TASKS,
    Seq2SeqDataset,
    eval_batches,
    make_task,
)
from jattn.training import classify, detection, sharding, validate
from jattn.training.checkpoint import Checkpointer, CheckpointError, MetricsLog
from jattn.training.config_files import (
    apply_overrides,
    load_config,
    shipped_configs,
    split_overrides,
)
from jattn.training.metrics import bleu, exact_match
from jattn.training.optim import learning_rate_schedule, make_optimizer
from jattn.training.parallel import initialize_distributed
from jattn.training.state import COUNTED, create_train_state
from jattn.training.workdir import WorkdirLock, check_writable

__all__ = [
    "MODELS",
    "build_model",
    "config_from_command_line",
    "load_config",
    "main",
    "model_options",
    "restore_model",
    "train_and_evaluate",
    "validate_config",
]

#: The models by name: a class, or ``"module:attribute"`` imported on first use.
MODELS = {
    "transformer": "jattn.models:Transformer",
    "bahdanau": "jattn.models.seq2seq:BahdanauSeq2Seq",
    "vit": "jattn.layers.vision:ViT",
    "vqa": "jattn.models.vqa:CoAttentionVQA",
    "detr": "jattn.models.detr:DETR",
}
# Optional top-level fields and their values when a config leaves them out.
_OPTIONAL_TOP = {"write_outside_workdir": True}
_FEATURE_KEYS = ("features", "d_model", "embed_dim", "model_dim", "qkv_features", "hidden_size")


def model_class(name: str):
    """The model class registered as ``name`` in :data:`MODELS`."""
    if name not in MODELS:
        raise ValueError(
            f"config.model.name: unknown model {name!r}; expected one of {sorted(MODELS)}"
        )
    entry = MODELS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


# Constructor arguments that the program supplies (from the data), not the config.
_SUPPLIED = (
    *("src_vocab_size", "tgt_vocab_size", "vocab_size"),
    *("num_classes", "image_size", "in_channels", "rngs"),
)


def model_options(name: str) -> dict:
    """``{option: default}``: what ``config.model`` may set for the model ``name``, the
    keyword arguments of its class (the data's sizes and ``rngs`` are supplied)."""
    params = inspect.signature(model_class(name).__init__).parameters
    return {
        key: (None if p.default is p.empty else p.default)
        for key, p in params.items()
        if key != "self"
        and key not in _SUPPLIED
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and the reason for a config that cannot train."""
    cfg = config.to_dict()
    top = {"seed", "compilation_cache_dir", "task", "model", "train", "eval"}
    known = top | set(_OPTIONAL_TOP)
    for key in cfg:
        if key not in known:
            raise validate.unknown_field(f"config.{key}", known)
    for key in top - set(cfg):
        raise ValueError(f"config.{key} is missing")
    if not isinstance(cfg.get("write_outside_workdir", True), bool):
        value = cfg["write_outside_workdir"]
        raise ValueError(
            f"config.write_outside_workdir must be True or False, got {value!r} "
            f"({type(value).__name__})"
        )
    if not validate._ok(validate._NONNEG_INT, cfg["seed"]) or cfg["seed"] >= 2**32:
        raise ValueError(f"config.seed must be an int in [0, 2**32), got {cfg['seed']!r}")
    validate.check_fields("train", cfg["train"], validate.SCHEMAS["train"])
    tcfg = cfg["train"]
    if tcfg["warmup_steps"] >= tcfg["num_steps"]:
        raise ValueError(
            f"config.train.warmup_steps={tcfg['warmup_steps']} must be less than "
            f"config.train.num_steps={tcfg['num_steps']}: the learning rate would never "
            "reach config.train.learning_rate"
        )
    validate.check_fields("eval", cfg["eval"], validate.SCHEMAS["eval"])
    _check_batch_splits(cfg, _mesh(cfg))
    task = dict(cfg["task"])
    name = task.pop("name", None)
    if name not in TASKS:
        raise ValueError(
            f"config.task.name: unknown task {name!r}; expected one of {sorted(TASKS)}"
        )
    validate.check_sizes("task", task)
    cls = model_class(cfg["model"].get("name"))
    kind, wants = task_kind(name), _model_kind(cls)
    if kind != wants:
        fits = sorted(m for m in MODELS if _model_kind(model_class(m)) == kind)
        raise ValueError(
            f"config.model.name={cfg['model']['name']!r} is a {wants} model, but task "
            f"{name!r} is {kind}: use one of {fits}"
        )
    if kind == "detection" and cfg["train"].get("label_smoothing", 0.0):
        raise ValueError(
            f"config.train.label_smoothing={cfg['train']['label_smoothing']!r}: task "
            f"{name!r} is detection, whose set loss has no label smoothing; set it to 0.0"
        )
    if kind != "seq2seq" and _config_option(cfg, "parallelism") == "sequence":
        raise ValueError(
            f"config.train.parallelism='sequence' splits sequences; task {name!r} is "
            f"{kind}: use 'data', 'fsdp' or 'tensor'"
        )
    validate.check_sizes("model", cfg["model"])
    _check_model_options(cls, cfg["model"])
    validate.check_heads_divide(cfg["model"], features_keys=_FEATURE_KEYS, heads_key="num_heads")


def task_kind(name: str) -> str:
    """``'classification'``, ``'detection'`` or ``'seq2seq'``: what the task ``name`` of
    :data:`TASKS` is."""
    if name in DETECTION_TASKS:
        return "detection"
    return "classification" if name in CLASSIFICATION_TASKS else "seq2seq"


def _model_kind(cls) -> str:
    """What the model class trains on: detectors take ``num_queries``, classifiers
    ``num_classes``."""
    params = inspect.signature(cls.__init__).parameters
    if "num_queries" in params:
        return "detection"
    return "classification" if "num_classes" in params else "seq2seq"


def _check_model_options(cls, model: dict) -> None:
    """Every option is one the model class takes, flags it declares as bools are bools,
    and special token ids are the data's (the tasks always pad with PAD and frame
    targets with BOS ... EOS)."""
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = set(model_options(model["name"])) | {"name"}
        for key in model:
            if key not in known:
                raise validate.unknown_field(
                    f"config.model.{key}", known, where=f" of model {model['name']!r}"
                )
    for key, value in model.items():
        default = params[key].default if key in params else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(
                f"config.model.{key} must be True or False, got {value!r} ({type(value).__name__})"
            )
    for key, data_id in (("pad_id", PAD), ("bos_id", BOS), ("eos_id", EOS)):
        if key in model and model[key] != data_id:
            raise ValueError(
                f"config.model.{key}={model[key]!r} must be {data_id}, the id the data uses"
            )


def _check_lengths(cfg: dict, *datasets: Seq2SeqDataset) -> None:
    """``config.model.max_len`` (where the model has one) covers the task's sequences."""
    max_len = cfg["model"].get("max_len")
    if max_len is None or not all(isinstance(ds, Seq2SeqDataset) for ds in datasets):
        return
    need = max(max(ds.src.shape[1], ds.tgt.shape[1]) for ds in datasets)
    if max_len < need:
        raise ValueError(
            f"config.model.max_len={max_len} is shorter than the task's sequences: the "
            f"model reads up to {need} tokens (source, or target with BOS); set it to at "
            f"least {need}"
        )


# config.json's record of the data's sizes (``vocab_sizes`` in older jattn versions).
_SIZES_KEYS = ("data_sizes", "vocab_sizes")


def _sizes_ok(sizes) -> bool:
    """``{name: size}`` with positive int sizes (or lists of them: an image size)."""

    def ok(v):
        return validate._ok(validate._POS_INT, v) or (
            isinstance(v, list) and bool(v) and all(validate._ok(validate._POS_INT, n) for n in v)
        )

    return isinstance(sizes, dict) and all(k in _SUPPLIED and ok(v) for k, v in sizes.items())


def _read_saved_config(path: Path) -> dict:
    """``config.json`` as saved by the run that wrote the checkpoints; ``ValueError``
    naming the file if it is damaged."""
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"holds a {type(saved).__name__}, not a config")
        for section in ("task", "model"):
            if not isinstance(saved.get(section, {}), dict):
                raise ValueError(f"its {section!r} is not a section")
        for key in _SIZES_KEYS:  # absent in workdirs of older jattn versions
            sizes = saved.get(key)
            if sizes is not None and not _sizes_ok(sizes):
                raise ValueError(f"its {key!r} is not a mapping of positive sizes: {sizes!r:.100}")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:200]}). It records the config "
            "of the run that wrote the checkpoints, to check that a resume uses the same "
            "model, task and seed: restore it, or delete it to resume without that check"
        ) from e
    return saved


def _check_resume(workdir: Path, cfg: dict, start: int) -> None:
    """A checkpoint at ``start`` in ``workdir`` can continue under ``cfg``: the same model,
    task and seed as the run that wrote it (``config.json``), and ``start <= num_steps``."""
    saved_path = workdir / "config.json"
    if saved_path.exists():
        saved = _read_saved_config(saved_path)
        now = json.loads(json.dumps(cfg))  # as config.json holds it (tuples as lists)
        changed = []
        if saved.get("seed") != now["seed"]:
            changed.append(f"config.seed: {saved.get('seed')!r} -> {now['seed']!r}")
        for section in ("task", "model"):
            old, new = saved.get(section, {}), now[section]
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    changed.append(f"config.{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
        if changed:
            raise ValueError(
                f"{workdir} holds a checkpoint of a run with another config ("
                + "; ".join(changed)
                + "): resume with the same seed, task and model, or use a new workdir"
            )
    if start > cfg["train"]["num_steps"]:
        raise ValueError(
            f"{workdir / 'checkpoints'} holds step {start}, past "
            f"config.train.num_steps={cfg['train']['num_steps']}: raise num_steps to continue "
            "or use a new workdir"
        )


def _eval_due(tcfg: dict, step: int) -> bool:
    """Whether the periodic evaluation runs after ``step`` (the final one always runs)."""
    return bool(tcfg["eval_every"]) and step % tcfg["eval_every"] == 0


def _config_option(cfg: dict, key: str, section: str = "train"):
    """``config.train.<key>`` (or ``config.<section>.<key>``), or its default for a config
    that leaves it out."""
    return cfg[section].get(key, validate.DEFAULTS[section][key])


def _mesh(cfg: dict) -> jax.sharding.Mesh:
    """The mesh of ``config.train.parallelism``, ``mesh_shape`` and ``num_devices``."""
    try:
        return sharding.make_mesh(
            _config_option(cfg, "parallelism"),
            tuple(_config_option(cfg, "mesh_shape")),
            _config_option(cfg, "num_devices"),
        )
    except ValueError as e:
        raise ValueError(f"config.train.{e}") from e


def _check_batch_splits(cfg: dict, mesh: jax.sharding.Mesh) -> None:
    """``config.train.batch_size`` splits evenly over the mesh axis ``'data'``."""
    batch_size, size = cfg["train"]["batch_size"], mesh.shape["data"]
    if batch_size % size == 0:
        return
    if len(mesh.axis_names) == 1:
        local = "local " * (jax.process_count() == 1)
        which = (
            f"all {local}devices"
            if _config_option(cfg, "num_devices") == 0
            else ("config.train.num_devices")
        )
        raise ValueError(
            f"config.train.batch_size={batch_size} must be a multiple of the {size} devices "
            f"it is split over ({which}); change it, or set config.train.num_devices"
        )
    raise ValueError(
        f"config.train.batch_size={batch_size} must be a multiple of {size}, the size of "
        f"the mesh axis 'data' it is split over (config.train.mesh_shape="
        f"{tuple(_config_option(cfg, 'mesh_shape'))}, axes {mesh.axis_names}); change either"
    )


def _describe_layout(parallelism: str, mesh: jax.sharding.Mesh, shardings) -> str:
    """One line on how the run lays out its state over ``mesh``."""
    platform = mesh.devices.flat[0].platform
    if parallelism == "data":
        return f"data parallel over {mesh.size} {platform} devices"
    params = jax.tree.leaves(shardings.params)
    split = sum(not s.is_fully_replicated for s in params)
    return (
        f"{parallelism} parallel over {mesh.size} {platform} devices, mesh "
        f"{dict(mesh.shape)}: {split} of {len(params)} parameter arrays split"
    )


def build_model(model_config: dict, *, seed: int, **sizes):
    """``MODELS[name]`` built from its config dataclass ``Config(**options, **sizes)``
    (:mod:`jattn.models`): ``sizes`` are the data's
    (``src_vocab_size=, tgt_vocab_size=`` for a sequence task; ``num_classes=`` and for
    images ``image_size=, in_channels=`` for classification)."""
    options = dict(model_config)
    cls = model_class(options.pop("name"))
    if "image_size" in sizes:
        sizes = {**sizes, "image_size": tuple(sizes["image_size"])}
    try:  # every model has a config dataclass of its options (jattn.models)
        config = cls.Config(**options, **sizes)
        return cls.from_config(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from e


class _StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum  # only set a flag: printing here could deadlock on tqdm's lock

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every float in ``tree`` is finite, as one bool."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


class _FiniteWatch:
    """Stops a run whose loss or parameters stop being finite, naming the step.

    Each step's loss stays on the device; :meth:`check` fetches those since the last
    check in one transfer. The loop calls it where it waits for the device anyway: at
    each metrics record, evaluation and checkpoint (and every ``_MAX_PENDING`` steps),
    so no step waits for its own loss. :meth:`check_state` also checks the parameters
    before a checkpoint save: a checkpoint never holds NaN or inf.
    """

    _MAX_PENDING = 1000

    def __init__(self, ckpt: Checkpointer, tcfg: dict):
        self._ckpt, self._tcfg = ckpt, tcfg
        self._pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, loss: jax.Array) -> None:
        self._pending.append((step, loss))
        if len(self._pending) >= self._MAX_PENDING:
            self.check()

    def check(self) -> None:
        """Raises ``FloatingPointError`` at the first NaN or inf loss since the last check."""
        pending, self._pending = self._pending, []
        values = jax.device_get([loss for _, loss in pending])
        for (step, _), value in zip(pending, values, strict=True):
            if not np.isfinite(value):
                raise self._error(f"the training loss became {float(value)} at step {step}")

    def check_state(self, step: int, state) -> None:
        """:meth:`check`, then the parameters after ``step`` are finite."""
        self.check()
        if not bool(_all_finite(state.params)):
            raise self._error(
                f"the parameters became NaN or infinite in the update of step {step} "
                "(its loss was finite)"
            )

    def _error(self, what: str) -> FloatingPointError:
        try:
            self._ckpt.wait()  # a save in flight holds an earlier, checked state
        except CheckpointError:
            pass  # then it is not a good checkpoint; latest_step() does not count it
        good, t = self._ckpt.latest_step(), self._tcfg
        if good is None:
            where, then = "no checkpoint was saved before it", "train again"
        else:
            where = f"the last good checkpoint is step {good} in {self._ckpt.directory}"
            then = "resume from it"
        return FloatingPointError(
            f"{what}; training stopped without saving that state, and {where}. Lower "
            f"config.train.learning_rate (now {t['learning_rate']:g}), raise "
            f"config.train.warmup_steps (now {t['warmup_steps']}) or lower "
            f"config.train.clip_norm (now {t['clip_norm']:g}), then run the same command "
            f"with the change to {then}"
        )


def evaluate(
    eval_step, state, ds: Seq2SeqDataset, *, batch_size: int, bleu_tokenize: str, place=None
):
    """Teacher-forced loss/token accuracy and exact match/BLEU of generated outputs;
    ``place(batch)`` puts each batch where ``eval_step`` reads it."""
    loss_sum = correct = tokens = 0.0
    predictions = []
    for n, batch in eval_batches(ds, batch_size, "tgt", PAD):  # all-PAD targets
        batch = batch if place is None else place(batch)
        ls, c, t, generated = jax.device_get(eval_step(state.params, state.rest, batch))
        loss_sum, correct, tokens = loss_sum + ls, correct + c, tokens + t
        predictions += [ds.decode(row) for row in generated[:n]]
    metrics = {
        "loss": float(loss_sum / tokens),
        "token_accuracy": float(correct / tokens),
        "exact_match": exact_match(predictions, ds.tgt_texts),
        "bleu": bleu(predictions, ds.tgt_texts, tokenize=bleu_tokenize),
    }
    return metrics, predictions


def _label(tokenizer, i: int) -> str:
    if i == EOS:
        return "</s>"
    if i == BOS:
        return "<s>"
    c = tokenizer.token(i)
    return "␣" if c == " " else c


def save_cross_attention_heatmaps(graphdef, state, ds, predictions, workdir, *, count):
    """Writes ``cross_attention_{i}.png`` for the first ``count`` test inputs: every
    cross-attention layer (rows) and head (columns), input characters on x, output
    characters on y. The decoder is fed the model's own predictions, so the plot shows
    the alignment behind what the model wrote. Also writes ``attention_explorer.html``:
    every attention layer of the model on the first input, in the interactive explorer
    (:mod:`jattn.explorer`). Returns the PNGs' paths."""
    if count <= 0:
        return []  # nor import matplotlib, which writes its font cache on import
    from jattn.viz import collect_attention_weights, plot_attention_grid, save_figure

    idx = np.arange(min(count, len(ds)))
    src = ds.src[idx]
    t = ds.tgt.shape[1]  # the decoder length the model was trained with
    # (t + 1: a prediction of t characters, cut off by max_len, has its EOS past t)
    pred = ds.tgt_tokenizer.encode_batch([predictions[i] for i in idx], t + 1)
    tgt_in = np.concatenate([np.full_like(pred[:, :1], BOS), pred[:, : t - 1]], axis=1)
    model = nnx.merge(graphdef, state.params, state.rest)
    sown = collect_attention_weights(model, src, tgt_in, deterministic=True)
    # cross-attention: named so, or else every layer whose weights are [.., T_out, S_in]
    shape = (tgt_in.shape[1], src.shape[1])
    cross = {k: np.asarray(w) for k, w in sown.items() if np.shape(w)[-2:] == shape}
    if any("cross" in k for k in cross):
        cross = {k: w for k, w in cross.items() if "cross" in k}
    paths = []
    for i in range(len(idx) if cross else 0):
        s_n = int(np.sum(src[i] != PAD))
        t_n = min(len(predictions[i]) + 1, t)  # the predicted characters and EOS
        layers = {k: (w[i] if w.ndim == 4 else w[i][None])[:, :t_n, :s_n] for k, w in cross.items()}
        fig = plot_attention_grid(
            layers,
            row_labels=[_label(ds.tgt_tokenizer, j) for j in pred[i, :t_n]],
            col_labels=[_label(ds.src_tokenizer, j) for j in src[i, :s_n]],
            title=f"cross-attention: {ds.src_texts[i]!r} -> {predictions[i]!r}",
            vmax=1.0,
        )
        paths.append(save_figure(fig, Path(workdir) / f"cross_attention_{i}.png", dpi=110))
    _save_explorer(sown, ds, src[0], pred[0], min(len(predictions[0]) + 1, t), workdir)
    return paths


def _save_explorer(sown, ds, src, pred, t_n: int, workdir) -> str | None:
    """``attention_explorer.html`` of every sown layer for one example: the encoder's
    self-attention over the input, the decoder's over the output, and any other layer
    (cross-attention, Bahdanau's) from the output to the input."""
    from jattn.explorer import attention_explorer

    s_n = int(np.sum(src != PAD))
    src_labels = [_label(ds.src_tokenizer, j) for j in src[:s_n]]
    tgt_labels = [_label(ds.tgt_tokenizer, j) for j in pred[:t_n]]
    layers, keys, queries = {}, {}, {}
    for name, w in sown.items():
        w = np.asarray(w)[0]
        w = w if w.ndim == 3 else w[None]  # [N, T, S]; one "head" for additive attention
        if "encoder" in name and "cross" not in name:
            q, k = src_labels, src_labels
        elif "self" in name:  # the decoder's self-attention
            q, k = tgt_labels, tgt_labels
        else:  # cross-attention, Bahdanau's attention
            q, k = tgt_labels, src_labels
        layers[name] = w[:, : len(q), : len(k)]
        keys[name], queries[name] = k, q
    if not layers:
        return None
    title = f"{ds.src_texts[0]!r} -> {''.join(tgt_labels)!r}"
    explorer = attention_explorer(layers, keys, query_tokens=queries, title=title)
    return explorer.save(Path(workdir) / "attention_explorer.html")


def _keep_matplotlib_cache_in(workdir: Path) -> None:
    """Points matplotlib's config and cache directory (``MPLCONFIGDIR``, by default
    ``~/.config/matplotlib`` and ``~/.cache/matplotlib``: its font list) at
    ``workdir/.matplotlib``, unless matplotlib is imported already (and so has written
    its cache)."""
    if "matplotlib" not in sys.modules:
        os.environ["MPLCONFIGDIR"] = str(Path(workdir).absolute() / ".matplotlib")


def make_datasets(config: ml_collections.ConfigDict) -> tuple:
    """``(train, test)`` of ``config.task``, generated in-process from ``config.seed``."""
    cfg = config.to_dict()
    task_options = {k: v for k, v in cfg["task"].items() if k != "name"}
    try:
        return make_task(cfg["task"]["name"], seed=cfg["seed"], **task_options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.task: {e}") from e


def _initial_train_state(cfg: dict, **sizes):
    """``(graphdef, state, tx)``: the model of ``cfg`` (with the data's ``sizes``) and its
    optimizer, freshly initialised."""
    model = build_model(cfg["model"], seed=cfg["seed"], **sizes)
    tx = make_optimizer(
        weight_decay=cfg["train"]["weight_decay"], clip_norm=cfg["train"]["clip_norm"]
    )
    graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(cfg["seed"]))
    return graphdef, state, tx


def _saved_model_config(workdir: Path) -> tuple[dict, dict[str, int]]:
    """``(config, data_sizes)`` as the run in ``workdir`` saved them in its ``config.json``
    (the sizes from the saved config's data set, for a workdir of a jattn version that
    did not save them)."""
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {path}: restore_model(workdir) reads the config that the run saved there; "
            "without it, pass the config: restore_model(config, workdir)"
        )
    cfg = _read_saved_config(path)
    for key in ("seed", "model", "train"):
        if key not in cfg:
            raise ValueError(f"{path} has no {key!r}: it is not the config.json of a jattn run")
    saved = [cfg.pop(key) for key in _SIZES_KEYS if key in cfg]
    if saved:
        sizes = saved[0]
    else:
        sizes = make_datasets(ml_collections.ConfigDict(cfg))[0].model_sizes()
    return cfg, sizes


def restore_model(
    workdir: str | os.PathLike | ml_collections.ConfigDict,
    legacy_workdir: str | os.PathLike | None = None,
    *,
    step: int | None = None,
):
    """The trained model of ``workdir``, with the parameters of its checkpoint (by default
    the newest that verifies against its checksums; damaged newer ones are skipped with
    a warning). A damaged ``step`` raises :class:`~jattn.training.checkpoint.CheckpointError`.

    The model's config, seed and vocabulary sizes come from ``workdir/config.json``, which
    the run saved beside its checkpoints: no config is needed and no data set is built
    (for a workdir written before jattn saved the vocabulary sizes there, the saved
    config's data set is built to find them).

    The older form ``restore_model(config, workdir)`` builds the model of ``config``
    instead, and its data set for the vocabulary sizes.

    >>> model = restore_model("workdir/dates")  # doctest: +SKIP
    >>> model.generate(src, max_len=10)  # doctest: +SKIP
    """
    config = None
    if isinstance(workdir, ml_collections.ConfigDict):  # restore_model(config, workdir)
        if legacy_workdir is None:
            raise TypeError("restore_model(config, workdir): workdir is missing")
        config, workdir = workdir, legacy_workdir
    elif legacy_workdir is not None:
        raise TypeError(
            f"restore_model(workdir, *, step=None) takes one workdir, got {workdir!r} and "
            f"{legacy_workdir!r}; the two-argument form is restore_model(config, workdir)"
        )
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if config is None:
        cfg, sizes = _saved_model_config(Path(workdir))
    else:
        validate_config(config)
        cfg, sizes = config.to_dict(), make_datasets(config)[0].model_sizes()
    graphdef, like, _ = _initial_train_state(cfg, **sizes)
    ckpt = Checkpointer(directory, max_to_keep=cfg["train"]["max_to_keep"])
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        if step is None:
            step, state, skipped = ckpt.restore_latest(like)
            for _, why in skipped:
                warnings.warn(f"skipped {why}", stacklevel=2)
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; it has {steps}")
        else:
            state = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state.params, state.rest)


def _restore_newest_good(ckpt: Checkpointer, like, *, say=tqdm.write):
    """``(step, state)`` of the newest checkpoint that verifies (``(None, like)`` if there
    is none), restored with the shardings of ``like``; newer damaged ones are reported
    by name (with ``say``) and set aside."""
    step, state, skipped = ckpt.restore_latest(like)
    for _, why in skipped:
        say(f"skipping {why}")
    if step is None:
        return None, like
    moved = [ckpt.set_aside(bad) for bad, _ in skipped]
    note = ""
    if moved:
        note = f" (the newest good one; damaged ones moved to {moved[0].parent})"
    say(f"resumed from {ckpt.path(step)} at step {step}{note}")
    return step, state


#: What the workdir is for, in the message when it cannot be written.
WORKDIR_USE = "the lock, config.json and metrics.jsonl"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config.model`` on ``config.task``, resuming from ``workdir`` if it holds a
    checkpoint; then evaluates on the held-out split and writes samples and heatmaps.

    The run holds ``workdir/train.lock`` while it runs (a second trainer on the same
    workdir is refused, naming the holder), checks that ``workdir`` and its
    ``checkpoints`` are writable before the first step, stops at once when a checkpoint
    or metrics write fails, and resumes from the newest checkpoint that verifies.

    Returns a dict with ``step``, ``interrupted`` (``None``, ``'stop_after_steps'`` or the
    signal number), the final ``eval`` metrics, ``train_step_compiles`` and output paths.
    """
    return _train(_prepare(config), workdir)


def _prepare(config: ml_collections.ConfigDict) -> tuple:
    """Everything :func:`train_and_evaluate` checks and builds before it touches the
    workdir: ``(cfg, train_ds, test_ds, graphdef, state, tx)``. A bad config field, data
    option or model option fails here, as a ValueError or TypeError naming it."""
    validate_config(config)
    cfg = config.to_dict()
    train_ds, test_ds = make_datasets(config)
    # bad model options fail here
    graphdef, state, tx = _initial_train_state(cfg, **train_ds.model_sizes())
    _check_lengths(cfg, train_ds, test_ds)
    return cfg, train_ds, test_ds, graphdef, state, tx


def _train(prepared: tuple, workdir) -> dict:
    """:func:`train_and_evaluate` of a run that :func:`_prepare` checked and built."""
    cfg, train_ds, test_ds, graphdef, state, tx = prepared
    workdir = Path(workdir)
    check_writable(workdir, WORKDIR_USE)  # creates it
    # Process 0 of a multi-process run holds the lock and writes the files.
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    opened = []  # what _train_locked opens, closed here if it fails
    try:
        if lock is not None and lock.stale:
            tqdm.write(f"{workdir}: taking over the lock of a trainer that died ({lock.stale})")
        return _train_locked(cfg, workdir, train_ds, test_ds, graphdef, state, tx, opened)
    except BaseException:
        for thing in reversed(opened):  # the error being raised says more than closing's
            try:
                thing.close()
            except Exception:
                pass
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg, workdir, train_ds, test_ds, graphdef, state, tx, opened) -> dict:
    """:func:`train_and_evaluate` once it holds ``workdir``; appends the checkpointer and
    metrics log it opens to ``opened``."""
    tcfg, ecfg = cfg["train"], cfg["eval"]
    primary = jax.process_index() == 0  # writes config.json, metrics and messages
    say = tqdm.write if primary else lambda message: None
    check_writable(workdir / "checkpoints", "checkpoints")  # creates it
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=tcfg["max_to_keep"])
    opened.append(ckpt)
    start = ckpt.latest_step()
    if start is not None:
        _check_resume(workdir, cfg, start)
    if primary:
        tmp = workdir / "config.json.tmp"  # the config, and what restore_model needs of the data
        tmp.write_text(json.dumps({**cfg, "data_sizes": train_ds.model_sizes()}, indent=2))
        os.replace(tmp, workdir / "config.json")

    num_steps = tcfg["num_steps"]
    schedule = learning_rate_schedule(
        tcfg["learning_rate"],
        num_steps=num_steps,
        warmup_steps=tcfg["warmup_steps"],
        decay=tcfg["decay"],
        end_factor=tcfg["end_lr_factor"],
    )
    mesh, parallelism = _mesh(cfg), _config_option(cfg, "parallelism")
    rules = sharding.RULES[parallelism]
    shardings = sharding.state_shardings(state, mesh, rules)
    if mesh.size > 1:
        say(_describe_layout(parallelism, mesh, shardings))
    kind = task_kind(cfg["task"]["name"])
    train_step = sharding.sharded_train_step(
        graphdef, tx, label_smoothing=tcfg["label_smoothing"], mesh=mesh, rules=rules, kind=kind
    )
    eval_step = sharding.sharded_eval_step(
        graphdef,
        max_len=test_ds.tgt.shape[1] if kind == "seq2seq" else 1,
        beam_size=_config_option(cfg, "beam_size", "eval"),
        length_penalty=_config_option(cfg, "length_penalty", "eval"),
        mesh=mesh,
        rules=rules,
        kind=kind,
    )

    def place(batch):  # a batch laid out as the steps read it
        return sharding.put(batch, sharding.batch_shardings(batch, mesh, rules))

    # Evaluation batches are padded anyway: round their size up to split evenly.
    data_size = mesh.shape["data"]
    eval_batch_size = -(-ecfg["batch_size"] // data_size) * data_size

    def run_eval(state):
        if kind == "classification":
            return classify.evaluate(
                eval_step, state, test_ds, batch_size=eval_batch_size, place=place
            )
        if kind == "detection":
            return detection.evaluate(
                eval_step, state, test_ds, batch_size=eval_batch_size, place=place
            )
        return evaluate(
            eval_step,
            state,
            test_ds,
            batch_size=eval_batch_size,
            bleu_tokenize=_config_option(cfg, "bleu_tokenize", "eval"),
            place=place,
        )

    # Fresh and restored states get the same placement, hence the same compiled step; a
    # checkpoint restores straight into it, whatever mesh saved it.
    state = sharding.put(state, shardings)
    if start is not None:
        start, state = _restore_newest_good(ckpt, state, say=say)
    state = sharding.put(state, shardings)
    log = MetricsLog(
        workdir / "metrics.jsonl", resume_step=start, final_step=num_steps, write=primary
    )
    opened.append(log)
    if log.dropped:
        s = "s" * (log.dropped > 1)
        say(f"{log.path}: dropped {log.dropped} damaged line{s}; kept the others")
    start = start or 0
    if 0 < start < num_steps and _eval_due(tcfg, start) and start not in log.eval_steps:
        m, _ = run_eval(state)  # the run that saved this checkpoint stopped before its eval
        log.write({"step": start, "split": "eval", **m})
    stop = num_steps
    if tcfg["stop_after_steps"]:
        stop = min(stop, max(start, tcfg["stop_after_steps"]))

    batch_size, seed = tcfg["batch_size"], cfg["seed"]
    # throughput in tokens (source and target) or examples per second
    counted = COUNTED[kind]
    per_step = batch_size
    if kind == "seq2seq":
        per_step *= train_ds.src.shape[1] + train_ds.tgt.shape[1]
    step, saved, interrupted = start, start, None
    finite = _FiniteWatch(ckpt, tcfg)
    bar = tqdm(
        total=num_steps,
        initial=start,
        desc="train",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not primary,
    )
    window_start, window_steps = time.perf_counter(), 0
    with _StopOnSignal() as stopper:
        while step < stop and stopper.signum is None:
            lr = np.float32(schedule(step))
            state, metrics = train_step(
                state, place(train_ds.sample_batch(seed, step, batch_size)), lr
            )
            step += 1
            window_steps += 1
            bar.update(1)
            finite.add(step, metrics["loss"])
            if step % tcfg["log_every"] == 0 or step == num_steps:
                finite.check()
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rate = window_steps * per_step / max(now - window_start, 1e-9)
                window_start, window_steps = now, 0
                record = {
                    "step": step,
                    "split": "train",
                    "learning_rate": float(lr),
                    f"{counted}_per_s": rate,
                    **metrics,
                }
                log.write(record)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    **{"tok_s" if kind == "seq2seq" else "ex_s": f"{rate:,.0f}"},
                )
            ckpt.poll()  # a checkpoint write that failed in the background stops here
            if step % tcfg["checkpoint_every"] == 0 and step < stop:
                finite.check_state(step, state)
                ckpt.save(step, state)
                saved = step
            if _eval_due(tcfg, step) and step < num_steps:
                finite.check()
                m, _ = run_eval(state)
                log.write({"step": step, "split": "eval", **m})
                say(f"step {step}: eval {m}")
        interrupted = stopper.signum
    bar.close()
    if interrupted is not None:
        say(f"signal {interrupted}: saving a checkpoint at step {step}")
    if saved != step or ckpt.latest_step() is None:
        finite.check_state(step, state)
        ckpt.save(step, state)
    ckpt.wait()
    result = {
        "step": step,
        "interrupted": interrupted,
        "workdir": str(workdir),
        # Entries in the jitted step's dispatch cache: 1 means compiled once. With several
        # devices JAX adds a second entry for the same executable once a checkpoint save
        # has read the state's typed PRNG keys (no XLA recompile: tests/test_sharded_training).
        "train_step_compiles": train_step._cache_size(),
    }
    if interrupted is None and step < num_steps:
        result["interrupted"] = "stop_after_steps"
    if result["interrupted"] is not None:
        again = "" if step > start else " with a larger config.train.stop_after_steps"
        say(f"stopped at step {step}; run the same command{again} to resume")
        log.close()
        ckpt.close()
        return result

    metrics, predictions = run_eval(state)
    log.write({"step": step, "split": "eval", **metrics})
    log.close()
    ckpt.close()
    result["eval"] = metrics
    result["heatmaps"] = []
    if jax.process_count() > 1 and ecfg["num_heatmaps"]:
        state = sharding.local_copy(state)  # every process takes part in the gather
    if not primary:
        return result
    print(
        f"held-out ({len(test_ds)} examples) after {step} steps: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    if not cfg.get("write_outside_workdir", True):
        _keep_matplotlib_cache_in(workdir)
    if kind == "detection":
        print("\n".join(detection.sample_lines(test_ds, predictions, ecfg["num_samples"])))
        return result
    if kind == "classification":
        print("\n".join(classify.sample_lines(test_ds, predictions, ecfg["num_samples"])))
        result["heatmaps"] = classify.save_heatmaps(
            graphdef, state, test_ds, predictions, workdir, count=ecfg["num_heatmaps"]
        )
        return result
    for i in range(min(ecfg["num_samples"], len(test_ds))):
        mark = "ok " if predictions[i] == test_ds.tgt_texts[i] else "BAD"
        print(
            f"  {mark} {test_ds.src_texts[i]!r:34} -> {predictions[i]!r}"
            f"  (reference {test_ds.tgt_texts[i]!r})"
        )
    result["heatmaps"] = save_cross_attention_heatmaps(
        graphdef, state, test_ds, predictions, workdir, count=ecfg["num_heatmaps"]
    )
    return result


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (``''`` disables)."""
    if not directory:
        return
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _argument_parser() -> argparse.ArgumentParser:
    configs = "\n".join(f"  {name:16} {doc}" for name, doc in shipped_configs().items())
    parser = argparse.ArgumentParser(
        prog="jattn-train",
        description="Train and evaluate a model on a built-in task (sequence to sequence, "
        "or classification: images, questions about images); the same command again "
        "resumes from the last checkpoint in --workdir.",
        epilog=f"""shipped configs (NAME, or NAME:small for a seconds-long run):
{configs}

overrides:
  --config.FIELD=VALUE  set a field of the config, e.g. --config.train.num_steps=200;
                        config.model also takes the options of its model class that
                        the config leaves out, e.g. --config.model.layer_norm_eps=1e-6

several processes (hosts): start the same command in each, with
  --coordinator_address HOST:PORT --num_processes N --process_id I
  (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); process 0 writes
  config.json, metrics.jsonl and the plots, all of them the checkpoints (orbax)

examples:
  jattn-train --config dates --workdir workdir/dates
  jattn-train --config copy:small --workdir /tmp/copy --config.train.num_steps=100
  jattn-train --config path/to/my_config.py --workdir /tmp/mine
  jattn-train --config dates --workdir /tmp/fsdp --config.train.parallelism=fsdp
  jattn-train --config vit_digits --workdir /tmp/digits  # pip install 'jattn[digits]'""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="NAME|FILE[:ARG]",
        help="a shipped config by name (listed below) or the path of a config file "
        "(a .py file with get_config(arg=None)); ':ARG' is passed to get_config",
    )
    parser.add_argument(
        "--workdir", required=True, metavar="DIR", help="checkpoints, metrics.jsonl and plots"
    )
    parser.add_argument(
        "--verbosity",
        type=int,
        default=-1,
        metavar="N",
        help="absl logging level: -1 warnings (the default), 0 info (orbax logs every save)",
    )
    group = parser.add_argument_group(
        "several processes", "the arguments of jax.distributed.initialize; leave them out for one"
    )
    group.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num_processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process_id", type=int, metavar="I", help="this process, 0 .. N-1")
    return parser


def config_from_command_line(spec: str, overrides) -> ml_collections.ConfigDict:
    """The locked, validated config of ``--config spec`` (``NAME``, ``FILE``, either
    with ``:ARG``) with the ``(field_path, text)`` overrides of
    :func:`~jattn.training.config_files.split_overrides` applied.

    ``config.model`` takes every option of the model class (:func:`model_options`), also
    those the config file leaves out. An ``--config.model.name`` override is applied
    first, so that the other model options are those of the model it names.
    """
    source, _, arg = spec.partition(":")
    config = load_config(source, arg or None)
    overrides = sorted(overrides, key=lambda o: o[0] != "model.name")  # stable: order kept

    def extra_fields(section_path: str, section) -> dict:
        return model_options(section.get("name")) if section_path == "model" else {}

    apply_overrides(config, overrides, extra_fields=extra_fields)
    config.lock()
    validate_config(config)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: ``jattn-train --config dates --workdir DIR`` (``argv``: the
    arguments after the program name; by default ``sys.argv[1:]``).

    ``--help`` lists the shipped configs; a missing flag, an unknown config or field and
    a value of the wrong type end the program with exit code 2 and a message naming them.
    """
    parser = _argument_parser()
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    try:  # before anything touches a device
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(str(e))
    try:
        config = config_from_command_line(args.config, overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(f"--config {args.config}: {e}")
    try:  # before the model is built: a workdir that cannot be written is a usage error
        check_writable(args.workdir, WORKDIR_USE)
    except OSError as e:
        parser.error(f"--workdir {args.workdir}: {e.strerror or e}")
    try:  # a model option or length the config's own checks leave to the model
        prepared = _prepare(config)
    except (ValueError, TypeError) as e:
        parser.error(f"--config {args.config}: {e}")
    from absl import logging

    logging.set_verbosity(args.verbosity)  # orbax logs every save at INFO
    if config.get("write_outside_workdir", True):
        try:
            enable_compilation_cache(config.compilation_cache_dir)
        except OSError as e:
            parser.error(
                f"config.compilation_cache_dir={config.compilation_cache_dir!r}: "
                f"{e.strerror or e} (--config.compilation_cache_dir= runs without the cache)"
            )
    result = _train(prepared, args.workdir)
    if isinstance(result["interrupted"], int):
        sys.exit(128 + result["interrupted"])


if __name__ == "__main__":
    main()
