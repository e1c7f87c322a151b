"""Date translation ("Saturday, March 3rd 2021" -> "2021-03-03") with a Bahdanau GRU seq2seq.

    python -m jattn.train --config bahdanau_dates --workdir /tmp/bahdanau_run
    python -m jattn.train --config bahdanau_dates:small --workdir /tmp/bahdanau_small
    python -m jattn.train --config bahdanau_dates --workdir /tmp/luong_run \\
        --config.model.score=bilinear

The default setting reaches >= 99% exact match on the held-out split; ``small`` is a
seconds-long smoke setting for tests and notebooks. Same structure as ``configs/dates.py``;
only ``config.model`` (and the step count) differ.
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.compilation_cache_dir = "~/.cache/jattn/jax"
    # False: nothing outside --workdir (no compilation cache; matplotlib's font cache
    # in workdir/.matplotlib)
    config.write_outside_workdir = True

    config.task = ml_collections.ConfigDict(dict(name="dates", num_train=50000, num_test=1000))

    config.model = ml_collections.ConfigDict()
    config.model.name = "bahdanau"
    config.model.embed_dim = 32
    config.model.hidden = 64
    config.model.num_layers = 1
    config.model.bidirectional = True
    config.model.dropout_rate = 0.0
    config.model.score = (
        "additive"  # or "bilinear" (Luong general); "dot" needs bidirectional=False
    )

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 600
    config.train.batch_size = 128
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.decay = "cosine"
    config.train.end_lr_factor = 0.01
    config.train.weight_decay = 0.01
    config.train.clip_norm = 1.0
    config.train.label_smoothing = 0.0
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.max_to_keep = 2
    config.train.eval_every = 0
    config.train.stop_after_steps = 0
    config.train.num_devices = 0  # train over this many devices; 0: all
    # "data" (state replicated, batches split), "fsdp" (parameters and optimizer state
    # split too), "tensor" (heads, MLP features, vocabularies split over 'model') or
    # "sequence" (batches split along their sequence axis over 'seq'); see
    # jattn.training.sharding
    config.train.parallelism = "data"
    # sizes of the strategy's mesh axes: ('data',), or ('data', 'model') / ('data', 'seq');
    # one may be -1; (): every device on the strategy's own axis
    config.train.mesh_shape = ()

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500
    config.eval.beam_size = 1
    config.eval.length_penalty = 0.6
    config.eval.num_samples = 8
    config.eval.num_heatmaps = 2
    config.eval.bleu_tokenize = "char"

    if arg == "small":
        config.task.num_train, config.task.num_test = 512, 32
        config.model.update(embed_dim=8, hidden=16)
        config.train.update(num_steps=6, batch_size=8, warmup_steps=2, log_every=1,
                            checkpoint_every=3)  # fmt: skip
        config.eval.update(batch_size=16, num_samples=2, num_heatmaps=1)
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; expected None or 'small'")
    return config
