"""Checkpoints (orbax) and the JSON-lines metrics log, both safe to interrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "MetricsLog"]


def _flat(tree) -> dict:
    """``{'params/encoder/...': leaf}``: readable names that do not depend on pytree classes."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


class Checkpointer:
    """Saves and restores a pytree state under ``directory`` with orbax.

    Orbax writes each step to a temporary directory and renames it when complete,
    so an interruption (even SIGKILL) never leaves a corrupt checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        """Saves ``state`` as ``step`` (asynchronously; :meth:`wait` blocks)."""
        self.manager.save(step, args=ocp.args.StandardSave(_flat(state)), force=True)

    def restore(self, step: int, like):
        """The state saved at ``step``, with the pytree structure of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _flat(like))
        flat = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        treedef = jax.tree.structure(like)
        return jax.tree.unflatten(treedef, [flat[k] for k in _flat(like)])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class MetricsLog:
    """Appends one JSON object per line to ``path``; each write is flushed and fsynced.

    On resume from ``resume_step`` (``None`` for a fresh run) the log keeps what
    describes the states up to that step, so no record is lost or repeated: train
    records up to ``resume_step`` and eval records up to it, except an eval at
    ``resume_step == final_step`` (the run has nothing left to train and evaluates
    again). A torn last line from a killed process is dropped.
    """

    def __init__(
        self, path: str | os.PathLike, *, resume_step: int | None, final_step: int | None = None
    ):
        self.path = Path(path)
        kept = []
        self.eval_steps: set[int] = set()  # steps of the eval records kept on resume
        if resume_step is not None and self.path.exists():
            eval_limit = resume_step - 1 if resume_step == final_step else resume_step
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):  # not a record of ours (edited by hand)
                    continue
                limit = resume_step if record.get("split") == "train" else eval_limit
                if record.get("step", limit + 1) <= limit:
                    kept.append(line + "\n")
                    if record.get("split") == "eval":
                        self.eval_steps.add(record["step"])
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
