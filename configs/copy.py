"""Copy task ("abcd" -> "abcd") with a small Transformer: a quick sanity run.

python -m jattn.train --config copy --workdir /tmp/copy
"""

import ml_collections
from jattn.configs import common


def get_config(arg=None):
    config = common.get_config()

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

    common.seq2seq_eval(config)
    config.train.num_steps = 600
    config.train.batch_size = 64
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 50
    config.train.checkpoint_every = 200
    config.eval.batch_size = 250
    config.eval.num_samples = 4
    config.eval.num_heatmaps = 1

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
