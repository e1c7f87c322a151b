"""Visual question answering on a generated toy, solved with co-attention.

    python -m jattn.train --config vqa_toy --workdir /tmp/vqa
    python -m jattn.train --config vqa_toy:small --workdir /tmp/vqa_small

A 3 x 3 canvas of digit cells and a question ("how many 7 ?", "what is left of 3 ?"),
generated in-process (:func:`jattn.data.vqa_task`: every training batch is new); the
answer is a digit. The model (:class:`jattn.models.vqa.CoAttentionVQA`) embeds each
8 x 8 cell as one patch; the question and the cells attend to each other, and in the
cells' self-attention four heads each see one neighbouring cell (left, right, above,
below). Heatmaps of each question token's attention over the cells are written next to
the checkpoints (``question_attention_*.png``). ``small`` is a seconds-long smoke
setting for tests.
"""

import ml_collections
from jattn.configs import common


def get_config(arg=None):
    config = common.get_config()

    config.task = ml_collections.ConfigDict(
        dict(name="vqa", num_train=1000, num_test=1000, grid=3, fill=0.7)
    )

    config.model = ml_collections.ConfigDict()
    config.model.name = "vqa"
    config.model.patch = 8  # one patch per cell
    config.model.stem_features = 16
    config.model.features = 64
    config.model.num_heads = 8
    config.model.num_layers = 3
    # the image's first four self-attention heads each see one neighbouring cell
    config.model.grid_neighbours = True
    config.model.mlp_features = 128
    config.model.dropout_rate = 0.0

    config.train.num_steps = 2000
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 200
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.eval_every = 500
    config.eval.num_heatmaps = 3

    if arg == "small":
        config.task.update(num_train=256, num_test=64)
        config.model.update(
            features=16, num_heads=4, num_layers=1, mlp_features=32, stem_features=4
        )
        config.train.update(
            num_steps=6, batch_size=16, warmup_steps=2, log_every=1, checkpoint_every=3,
            eval_every=0,
        )  # fmt: skip
        config.eval.update(batch_size=32, num_samples=2, num_heatmaps=1)
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; expected None or 'small'")
    return config
