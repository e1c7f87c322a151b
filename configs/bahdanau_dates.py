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
from jattn.configs import common


def get_config(arg=None):
    config = common.get_config()

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

    common.seq2seq_eval(config)
    config.train.num_steps = 600
    config.train.learning_rate = 3e-3
    config.train.checkpoint_every = 200

    if arg == "small":
        config.task.num_train, config.task.num_test = 512, 32
        config.model.update(embed_dim=8, hidden=16)
        config.train.update(num_steps=6, batch_size=8, warmup_steps=2, log_every=1,
                            checkpoint_every=3)  # fmt: skip
        config.eval.update(batch_size=16, num_samples=2, num_heatmaps=1)
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; expected None or 'small'")
    return config
