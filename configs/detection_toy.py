"""A small DETR finding digits on a canvas (a detection toy, generated in-process).

    python -m jattn.train --config detection_toy --workdir /tmp/detection
    python -m jattn.train --config detection_toy:small --workdir /tmp/detection_small

One to three digits of two sizes on a 32 x 32 canvas (:func:`jattn.data.detection_task`,
every training batch new); the model (:class:`jattn.models.detr.DETR`) embeds 4 x 4
patches after a convolutional stem, encodes them, and 6 object queries cross-attend to
them, each predicting a class or "no object" and a box. Trained with DETR's set loss
(Hungarian matching, :func:`jattn.training.detection.set_loss`); the evaluation reports
``ap50`` (mean AP over the digits at IoU 0.5). ``small`` is a seconds-long smoke setting.
"""

import ml_collections
from jattn.configs import common


def get_config(arg=None):
    config = common.get_config()

    config.task = ml_collections.ConfigDict(
        dict(name="detection", num_train=500, num_test=500, canvas=32, max_objects=3)
    )

    config.model = ml_collections.ConfigDict()
    config.model.name = "detr"
    config.model.patch = 4  # 8 x 8 patches
    config.model.stem_features = 32
    config.model.stem_layers = 2
    config.model.num_queries = 6
    config.model.features = 64
    config.model.num_heads = 4
    config.model.mlp_features = 128
    config.model.num_encoder_layers = 2
    config.model.num_decoder_layers = 2
    config.model.dropout_rate = 0.0

    config.train.num_steps = 1500
    config.train.batch_size = 64
    config.train.warmup_steps = 200
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.eval_every = 500
    config.eval.batch_size = 250
    config.eval.num_samples = 4
    config.eval.num_heatmaps = 0

    if arg == "small":
        config.task.update(num_train=16, num_test=32)
        config.model.update(
            features=16, num_heads=2, mlp_features=32, num_encoder_layers=1,
            num_decoder_layers=1, stem_features=4, stem_layers=1,
        )  # fmt: skip
        config.train.update(
            num_steps=6, batch_size=8, warmup_steps=2, log_every=1, checkpoint_every=3,
            eval_every=0,
        )  # fmt: skip
        config.eval.update(batch_size=16, num_samples=2)
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; expected None or 'small'")
    return config
