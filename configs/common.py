"""The settings every task config shares (not a config to run by itself).

A task config extends it: ``config = common.get_config()`` (``from jattn.configs import
common``, also from a config file of your own), then sets ``config.task`` and
``config.model`` and changes what differs from these defaults. Sequence-to-sequence
configs add their decoding options with :func:`seq2seq_eval`.
"""

import ml_collections


def get_config(arg=None):
    """The run options and the train and eval defaults (``arg`` is not used)."""
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.compilation_cache_dir = "~/.cache/jattn/jax"
    # False: nothing outside --workdir (no compilation cache; matplotlib's font cache
    # in workdir/.matplotlib)
    config.write_outside_workdir = True

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1000
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 100
    config.train.decay = "cosine"
    config.train.end_lr_factor = 0.01
    config.train.weight_decay = 0.01
    config.train.clip_norm = 1.0
    config.train.label_smoothing = 0.0
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.max_to_keep = 2
    config.train.eval_every = 0
    config.train.stop_after_steps = 0
    config.train.num_devices = 0  # train over this many devices; 0: all
    # "data" (state replicated, batches split), "fsdp" (parameters and optimizer state
    # split too), "tensor" (heads, MLP features, vocabularies split over 'model') or
    # "sequence" (batches split along their sequence axis over 'seq'; sequence tasks);
    # see jattn.training.sharding
    config.train.parallelism = "data"
    # sizes of the strategy's mesh axes: ('data',), or ('data', 'model') / ('data', 'seq');
    # one may be -1; (): every device on the strategy's own axis
    config.train.mesh_shape = ()

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500
    config.eval.num_samples = 8
    config.eval.num_heatmaps = 2
    return config


def seq2seq_eval(config):
    """Adds the decoding options of a sequence-to-sequence task's evaluation."""
    config.eval.beam_size = 1
    config.eval.length_penalty = 0.6
    config.eval.bleu_tokenize = "char"
    return config
