"""Training utilities at the edge of the library: losses, metrics, optimizer, state,
checkpoints and config checks. ``jattn.train`` puts them together."""

from jattn.training.checkpoint import Checkpointer, CheckpointError, MetricsLog, read_metrics
from jattn.training.losses import masked_cross_entropy
from jattn.training.metrics import bleu, exact_match, token_accuracy_counts
from jattn.training.optim import learning_rate_schedule, make_optimizer
from jattn.training.parallel import batch_sharding, data_parallel_mesh, replicated
from jattn.training.state import TrainState, create_train_state, make_eval_step, make_train_step
from jattn.training.workdir import WorkdirLock, WorkdirLockedError

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "MetricsLog",
    "TrainState",
    "WorkdirLock",
    "WorkdirLockedError",
    "batch_sharding",
    "bleu",
    "create_train_state",
    "data_parallel_mesh",
    "exact_match",
    "learning_rate_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "masked_cross_entropy",
    "read_metrics",
    "replicated",
    "token_accuracy_counts",
]
