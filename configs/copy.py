"""Copy task ("abcd" -> "abcd") with a small Transformer: a quick sanity run.

python -m jattn.train --config copy --workdir /tmp/copy
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.compilation_cache_dir = "~/.cache/jattn/jax"
    # False: nothing outside --workdir (no compilation cache; matplotlib's font cache
    # in workdir/.matplotlib)
    config.write_outside_workdir = True

    config.task = ml_collections.ConfigDict(
        dict(name="copy", num_train=10000, num_test=500, min_len=1, max_len=10, num_symbols=10)
    )

    config.model = ml_collections.ConfigDict()
    config.model.name = "transformer"
    config.model.num_encoder_layers = 2
    config.model.num_decoder_layers = 2
    config.model.features = 64
    config.model.num_heads = 4
    config.model.mlp_features = 128
    config.model.dropout_rate = 0.0
    config.model.max_len = 16
    config.model.pre_norm = True

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 600
    config.train.batch_size = 64
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 50
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
    config.eval.batch_size = 250
    config.eval.beam_size = 1
    config.eval.length_penalty = 0.6
    config.eval.num_samples = 4
    config.eval.num_heatmaps = 1
    config.eval.bleu_tokenize = "char"

    if arg == "small":
        config.task.update(num_train=256, num_test=16, max_len=5)
        config.model.update(
            num_encoder_layers=1,
            num_decoder_layers=1,
            features=16,
            num_heads=2,
            mlp_features=32,
            max_len=8,
        )
        config.train.update(
            num_steps=6, batch_size=8, warmup_steps=2, log_every=1, checkpoint_every=3
        )
        config.eval.update(batch_size=16, num_samples=2, num_heatmaps=1)
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; expected None or 'small'")
    return config
