"""A Vision Transformer on scikit-learn's handwritten digits (8x8, 10 classes).

    pip install 'jattn[digits]'
    python -m jattn.train --config vit_digits --workdir /tmp/vit_digits
    python -m jattn.train --config vit_digits:small --workdir /tmp/vit_digits_small

scikit-learn's example split (the first 898 images train, the last 899 test); its SVM
scores 96.9% on the test half. The default setting reaches at least 97% test accuracy
(``accuracy`` in the eval records of ``metrics.jsonl``) in a few minutes on a 2-core
CPU, and writes attention-rollout heatmaps of test images (``rollout_*.png``) next to
the checkpoints. ``small`` is a seconds-long smoke setting for tests.
"""

import ml_collections
from jattn.configs import common


def get_config(arg=None):
    config = common.get_config()

    # training images move by up to a pixel each way, turn by up to 12 degrees and
    # scale by up to 10%
    config.task = ml_collections.ConfigDict(
        dict(name="digits", max_shift=1, max_rotation=12.0, max_scale=0.1)
    )

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit"
    config.model.patch = 2  # 4 x 4 patches of 2 x 2 pixels
    # two 3 x 3 convolutions (64 channels) before the patches: early convolutions help a
    # transformer on a data set this small
    config.model.stem_features = 64
    config.model.stem_layers = 2
    config.model.features = 64
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.mlp_features = 128
    config.model.pool = "cls"
    config.model.posemb = "learned"
    config.model.dropout_rate = 0.1

    config.train.num_steps = 3000
    config.train.warmup_steps = 200
    config.train.weight_decay = 0.05
    config.train.label_smoothing = 0.1
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.eval_every = 500
    config.eval.batch_size = 300
    config.eval.num_heatmaps = 4

    if arg == "small":
        config.model.update(
            features=16, num_layers=1, num_heads=2, mlp_features=32, stem_features=4
        )
        config.train.update(
            num_steps=6, batch_size=16, warmup_steps=2, log_every=1, checkpoint_every=3,
            eval_every=0,
        )  # fmt: skip
        config.eval.update(num_samples=2, num_heatmaps=1)
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; expected None or 'small'")
    return config
