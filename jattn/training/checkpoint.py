"""Checkpoints (orbax) and the JSON-lines metrics log, both safe to interrupt.

Each checkpoint records a SHA-256 of every array it saved (in orbax's step metadata);
a restore recomputes them, so a checkpoint damaged on disk is refused by name instead
of resuming from wrong values. Orbax has no such check of its own: bytes flipped in an
array's stored data restore silently (its zarr3 crc32c covers only each shard's index;
damage elsewhere mostly fails to decode, and is reported as unreadable).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jattn.functional._checks import check_size, is_int

__all__ = ["CheckpointError", "Checkpointer", "MetricsLog", "checksums", "read_metrics"]

_CHECKSUMS = "jattn_sha256"  # key of the per-array digests in the step's custom metadata
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's step metadata file (custom metadata inside)


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or does not read back as it was saved."""


def _flat(tree) -> dict:
    """``{'params/encoder/...': leaf}``: readable names that do not depend on pytree classes."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _host_values(flat: dict) -> dict:
    """The whole value of each array on this host. An array split over the devices of
    several processes is gathered from all of them (a collective: every process of
    the run saves and restores together, as orbax needs anyway)."""

    def data(leaf):  # typed PRNG keys hash by their raw key data
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return multihost_utils.process_allgather(leaf, tiled=True)
        return leaf

    return jax.device_get({k: data(v) for k, v in flat.items()})


def checksums(flat: dict) -> dict[str, str]:
    """``{name: sha256 hex}`` of each array of a flat state: dtype, shape and bytes."""
    out = {}
    for name, value in _host_values(flat).items():
        a = np.asarray(value)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        out[name] = h.hexdigest()
    return out


class Checkpointer:
    """Saves and restores a pytree state under ``directory`` with orbax, verified.

    Orbax writes each step to a temporary directory and renames it when complete,
    so an interruption (even SIGKILL) never leaves a partial checkpoint under a step's
    name. Saves run in the background; :meth:`poll` raises :class:`CheckpointError` as
    soon as one has failed (the previous checkpoints stay as they were), and
    :meth:`restore` raises it for a checkpoint that is incomplete or whose arrays no
    longer match the checksums recorded when it was saved.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int):
        max_to_keep = check_size("max_to_keep", max_to_keep)  # 0 kept none, "2" a TypeError
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,  # left by a save that failed or was killed
                # Orbax's default creates a step's directory on a background thread; when
                # that fails (a read-only directory) the error surfaces a save later and
                # threads left waiting for the directory hold up the process's exit for
                # the async timeout. Created here, a failure raises at once from save().
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            ),
            # One item of known type: a step directory that is empty or lost its item
            # then fails alone, instead of setting the manager to expect other layouts.
            item_handlers=ocp.StandardCheckpointHandler(),
        )
        self._pending: int | None = None  # the step being written in the background

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _complete_steps(self, but: int | None = None) -> list[int]:
        if not self.directory.is_dir():
            return []
        names = (p.name for p in self.directory.iterdir())
        return sorted(int(n) for n in names if n.isdigit() and int(n) != but)

    def _write_error(self, step: int | None, e: Exception) -> CheckpointError:
        done = self._complete_steps(but=step)
        last = f"the last one, {self.path(done[-1])}, is intact" if done else "there is none"
        what = "a checkpoint" if step is None else f"checkpoint {self.path(step)}"
        return CheckpointError(
            f"could not write {what} ({type(e).__name__}: {e}); "
            f"training stopped. Earlier checkpoints are untouched ({last}): make "
            f"{self.directory} writable or free space, then run the same command to resume"
        )

    def save(self, step: int, state) -> None:
        """Saves ``state`` as ``step`` with the checksums of its arrays (in the
        background; :meth:`poll` reports a failure, :meth:`wait` blocks)."""
        if not is_int(step) or step < 0:  # "2.5" made a directory no listing counts
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._pending is not None:
            self.wait()  # orbax would wait too, and blame its failure on this step
        flat = _flat(state)
        metadata = {_CHECKSUMS: checksums(flat)}
        try:
            self.manager.save(
                step, args=ocp.args.StandardSave(flat), force=True, custom_metadata=metadata
            )
        except Exception as e:
            raise self._write_error(step, e) from e
        self._pending = step

    def poll(self) -> None:
        """Raises :class:`CheckpointError` if a background save has failed; never blocks
        on one still running."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the background save is written; raises :class:`CheckpointError`
        if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from e

    def _recorded_checksums(self, step: int) -> dict | None:
        """The checksums saved with ``step``; ``None`` for a checkpoint saved before
        checksums existed. Raises ``ValueError`` if the record is missing or damaged."""
        custom = self.manager.metadata(step).custom_metadata or {}
        recorded = custom.get(_CHECKSUMS)
        if isinstance(recorded, dict):
            return recorded
        if recorded is not None:
            raise ValueError(f"its checksum record is not a mapping: {recorded!r:.80}")
        # Orbax reads a missing or damaged step metadata file as empty (and logs an
        # error): only an intact file without custom metadata is an older checkpoint's.
        try:
            saved = json.loads((self.path(step) / _STEP_METADATA).read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"its {_STEP_METADATA}, with the checksums, is unreadable: {e}") from e
        if not isinstance(saved, dict) or saved.get("custom_metadata"):
            raise ValueError(f"its {_STEP_METADATA} has no checksums but other metadata")
        return None

    def restore(self, step: int, like):
        """The state saved at ``step``, with the pytree structure of ``like``, verified
        against the checksums recorded at save time (:class:`CheckpointError` if it
        differs or cannot be read; a warning for one saved before checksums existed).

        Each array is restored with the sharding of its counterpart in ``like``: a
        checkpoint saved on one mesh (8 devices, parameters split) resumes on another
        (4 devices, or 1) when ``like`` is placed there.
        """
        where = self.path(step)
        # a Python scalar leaf restores as the array it was saved as (not as a Python
        # value, whose checksum would differ)
        flat_like = {
            k: v if hasattr(v, "dtype") else jnp.asarray(v) for k, v in _flat(like).items()
        }
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flat_like)
        self._check_layout(step, abstract)
        try:
            recorded = self._recorded_checksums(step)
            flat = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {where} is incomplete or unreadable ({type(e).__name__}: "
                f"{str(e)[:300]})"
            ) from e
        if recorded is None:
            warnings.warn(
                f"checkpoint {where} has no checksums (saved by an older jattn): restored "
                "without verification",
                stacklevel=2,
            )
        else:
            actual = checksums(flat)
            bad = sorted(
                k for k in recorded.keys() | actual.keys() if recorded.get(k) != actual.get(k)
            )
            if bad:
                raise CheckpointError(
                    f"checkpoint {where} is damaged: {len(bad)} of its {len(recorded)} arrays "
                    f"differ from the checksums recorded when it was saved (e.g. {bad[0]})"
                )
        treedef = jax.tree.structure(like)
        return jax.tree.unflatten(treedef, [flat[k] for k in _flat(like)])

    def _check_layout(self, step: int, abstract: dict) -> None:
        """A ValueError if ``abstract`` (the state to restore into) names other arrays,
        dtypes or shapes than checkpoint ``step`` holds: orbax would cast or fail, and
        the checksums would then call an intact checkpoint damaged (the training program
        sets damaged ones aside). Unreadable metadata is left to :meth:`restore`."""
        try:
            saved = dict(self.manager.item_metadata(step).items())
        except Exception:  # noqa: BLE001 (damaged: restore() says how)
            return
        where, canonical = self.path(step), jax.dtypes.canonicalize_dtype
        missing, extra = (
            sorted(abstract.keys() - saved.keys()),
            sorted(saved.keys() - abstract.keys()),
        )
        if missing or extra:
            raise ValueError(
                f"the state to restore into does not match checkpoint {where}: it has "
                f"{len(missing)} array(s) the checkpoint lacks ({missing[:3]}) and lacks "
                f"{len(extra)} the checkpoint holds ({extra[:3]}); restore with the config "
                "that saved it"
            )
        for key, want in abstract.items():
            got = saved[key]
            dtype, shape = canonical(want.dtype), tuple(want.shape)
            if canonical(got.dtype) != dtype or tuple(got.shape) != shape:
                raise ValueError(
                    f"checkpoint {where} holds {key} as {got.dtype}{list(got.shape)}, but the "
                    f"state to restore into has {dtype}{list(shape)}: restore with the "
                    "config (dtypes, sizes) that saved it"
                )

    def restore_latest(self, like) -> tuple[int | None, object, list[tuple[int, str]]]:
        """``(step, state, skipped)``: the newest checkpoint that restores and verifies,
        and ``(step, why)`` for each newer one that does not; ``(None, None, [])``
        without checkpoints. Raises :class:`CheckpointError` listing them all if none
        is good."""
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, like), skipped
            except CheckpointError as e:
                skipped.append((step, str(e)))
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored:\n  "
                + "\n  ".join(why for _, why in skipped)
                + f"\nMove {self.directory} away (or use another --workdir) to train from "
                "scratch; a config that differs from the one that saved them fails the same way"
            )
        return None, None, []

    def set_aside(self, step: int) -> Path:
        """Moves a damaged checkpoint to ``<directory>.damaged/<step>`` (kept for a look,
        out of the way of the step's next save); returns where it went."""
        target_dir = self.directory.with_name(self.directory.name + ".damaged")
        target_dir.mkdir(exist_ok=True)
        target, n = target_dir / str(step), 1
        while target.exists():
            target, n = target_dir / f"{step}.{n}", n + 1
        os.replace(self.path(step), target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self._pending = None
        self.manager.close()


def _json_scalar(x):
    """A NumPy or JAX scalar (``np.float32(0.5)``, a 0-d array) as its Python value, for
    ``json.dumps``; a TypeError naming the type for anything else."""
    if isinstance(x, np.generic) or (hasattr(x, "ndim") and x.ndim == 0 and hasattr(x, "item")):
        return x.item()
    raise TypeError(f"a metrics value must be a number, str, list or dict, got {type(x).__name__}")


def _record(line: bytes) -> dict | None:
    """The metrics record on ``line``; ``None`` if it is damaged (not UTF-8, not JSON,
    or not an object with an int ``step`` and a str ``split``)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return record if isinstance(record.get("split"), str) else None


class MetricsLog:
    """Appends one JSON object per line to ``path``; each write is flushed and fsynced.

    On resume from ``resume_step`` (``None`` for a fresh run) the log keeps what
    describes the states up to that step, so no record is lost or repeated: train
    records up to ``resume_step`` and eval records up to it, except an eval at
    ``resume_step == final_step`` (the run has nothing left to train and evaluates
    again). Damaged lines (a torn last line from a killed process, bytes that are not
    UTF-8 or not a JSON record) are dropped and counted in :attr:`dropped`. The kept
    lines replace the file atomically (a temporary file, then ``os.replace``).

    With ``write=False`` (the processes other than process 0 of a multi-process run)
    the log reads the file for :attr:`eval_steps` and never writes it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None,
        final_step: int | None = None,
        write: bool = True,
    ):
        self.path = Path(path)
        self._file = None
        kept = []
        self.eval_steps: set[int] = set()  # steps of the eval records kept on resume
        self.dropped = 0  # damaged lines dropped on resume
        if resume_step is not None and self.path.exists():
            eval_limit = resume_step - 1 if resume_step == final_step else resume_step
            for line in self.path.read_bytes().split(b"\n"):
                if not line.strip():
                    continue
                record = _record(line)
                if record is None:
                    self.dropped += 1
                    continue
                limit = resume_step if record["split"] == "train" else eval_limit
                if record["step"] <= limit:
                    kept.append(line + b"\n")
                    if record["split"] == "eval":
                        self.eval_steps.add(record["step"])
        if not write:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._file = open(self.path, "a")  # noqa: SIM115
        except OSError as e:
            raise self._write_error(e) from e

    def _write_error(self, e: OSError) -> OSError:
        return OSError(
            e.errno,
            f"could not write {self.path} ({e.strerror or e}); training stopped. Make "
            f"{self.path.parent} writable or free space, then run the same command to "
            "resume from the last checkpoint",
        )

    def write(self, record: dict) -> None:
        """Appends ``record``: a dict with an int ``step`` and a str ``split`` (what
        :func:`read_metrics` reads back), its values JSON or NumPy/JAX scalars."""
        step = record.get("step") if isinstance(record, dict) else None
        if not is_int(step) or not isinstance(record.get("split"), str):
            # else written, and the whole file refused by read_metrics later
            raise ValueError(
                f"a metrics record needs an int 'step' and a str 'split', got {record!r:.120}"
            )
        line = json.dumps(record, default=_json_scalar)  # before the file: no torn line
        if self._file is None:
            return
        try:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise self._write_error(e) from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics file; a damaged line raises ``ValueError`` naming it."""
    records = []
    for i, line in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        if line.strip():
            record = _record(line)
            if record is None:
                raise ValueError(f"{path}, line {i}, is not a metrics record: {line[:80]!r}")
            records.append(record)
    return records
