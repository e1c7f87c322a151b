"""The training program under storage faults: damaged checkpoints, metrics and config are
named and skipped (or repaired), unwritable storage stops a run before or at the failed
write instead of hanging, one trainer holds a workdir, and generate works inside jax.jit.

We run as root, to whom chmod'ed directories stay writable, so the unwritable cases are
simulated: ``os.access`` saying no, or ``os.makedirs`` failing with EACCES under the
checkpoint directory (what a read-only ``checkpoints/`` gives a non-root user).
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _train_utils import ROOT, load_config, train_losses
from flax import nnx

import jattn.train as train_lib
from jattn.models import DecoderLM, Transformer
from jattn.models.seq2seq import BahdanauSeq2Seq
from jattn.training import read_metrics
from jattn.training.checkpoint import CheckpointError
from jattn.training.workdir import WorkdirLock, WorkdirLockedError

# As tests/test_resume.py: a long schedule stopped early, so every run in a process shares
# one compiled train step (and the resumed losses must equal the uninterrupted ones).
OVERRIDES = {"num_steps": 5000, "checkpoint_every": 3, "log_every": 1}


def config(stop_after_steps):
    cfg = load_config("dates", "small")
    cfg.train.update(**OVERRIDES, stop_after_steps=stop_after_steps)
    return cfg


def run(workdir, stop_after_steps):
    return train_lib.train_and_evaluate(config(stop_after_steps), str(workdir))


def losses(workdir):
    return train_losses(read_metrics(workdir / "metrics.jsonl"))


def steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of 6 steps (checkpoints 3 and 6), copied by each test that damages it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    run(workdir, 6)
    assert steps(workdir / "checkpoints") == [3, 6]
    return workdir


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def orbax_restore(directory, step) -> dict:
    """The arrays of a checkpoint as orbax alone reads them: no verification."""
    manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()
    keys = jax.dtypes.prng_key
    return {
        k: np.asarray(v) for k, v in restored.items() if not jax.dtypes.issubdtype(v.dtype, keys)
    }


def damage_silently(directory, step) -> str:
    """XORs 16 bytes of an array's stored data in one file of checkpoint ``step``, as a
    bad disk block would, choosing a place orbax reads without noticing (orbax compresses
    most arrays and checks its index, so many places fail loudly); returns the array."""
    saved = orbax_restore(directory, step)
    files = [p for p in (directory / str(step)).rglob("*") if p.is_file()]
    for name, value in sorted(saved.items(), key=lambda kv: -kv[1].nbytes):
        needle = value.tobytes()[:64]
        for path in files if len(needle) == 64 else ():
            original = path.read_bytes()
            at = original.find(needle) + 32
            if at < 32:
                continue
            flipped = bytes(b ^ 0xFF for b in original[at : at + 16])
            path.write_bytes(original[:at] + flipped + original[at + 16 :])
            try:
                if not np.array_equal(orbax_restore(directory, step)[name], value):
                    return name
            except Exception:
                pass
            path.write_bytes(original)
    raise AssertionError(f"found no place in {directory / str(step)} to damage silently")


# ------------------------------------------------------------------------------ integrity


def test_flipped_bytes_in_the_latest_checkpoint_are_caught_and_the_run_resumes_before(
    trained, tmp_path, capsys
):
    workdir = copy_of(trained, tmp_path)
    damage_silently(workdir / "checkpoints", 6)  # orbax alone restores wrong values
    capsys.readouterr()

    with pytest.raises(CheckpointError, match=r"checkpoints/6 is damaged: 1 of its \d+ arrays"):
        train_lib.restore_model(config(6), str(workdir), step=6)
    result = run(workdir, 7)
    out = capsys.readouterr().out
    assert "checkpoints/6 is damaged" in out
    assert f"resumed from {workdir / 'checkpoints' / '3'} at step 3" in out
    assert result["step"] == 7
    # steps 4-6 trained again from the good checkpoint give the uninterrupted losses
    reference = losses(trained)
    assert {s: v for s, v in losses(workdir).items() if s <= 6} == reference
    assert sorted(losses(workdir)) == list(range(1, 8))
    assert steps(workdir / "checkpoints.damaged") == [6]  # kept for a look, out of the way
    assert steps(workdir / "checkpoints") == [6, 7]


def test_an_emptied_latest_checkpoint_is_skipped_for_the_previous_one(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    latest = workdir / "checkpoints" / "6"
    shutil.rmtree(latest)
    latest.mkdir()
    result = run(workdir, 4)
    out = capsys.readouterr().out
    assert f"checkpoint {latest} is incomplete or unreadable" in out
    assert "resumed from" in out and "at step 3" in out
    assert result["step"] == 4 and sorted(losses(workdir)) == [1, 2, 3, 4]
    assert losses(workdir)[4] == losses(trained)[4]


def test_without_a_good_checkpoint_the_run_names_each_and_moves_nothing(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for step in (3, 6):
        (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_bytes(b"\xff{")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored") as e:
        run(workdir, 7)
    message = str(e.value)
    assert "checkpoints/6 is incomplete or unreadable" in message
    assert "checkpoints/3 is incomplete or unreadable" in message
    assert "_CHECKPOINT_METADATA, with the checksums, is unreadable" in message
    assert (
        steps(workdir / "checkpoints") == [3, 6] and not (workdir / "checkpoints.damaged").exists()
    )
    assert sorted(losses(workdir)) == list(range(1, 7))  # the log is untouched too


# --------------------------------------------------------------------- damaged metrics/config


def test_damaged_metrics_lines_are_dropped_and_counted(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    path = workdir / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"step": 2, "split": "tr\xff\xfein"}\n'  # not UTF-8
    lines[2] = lines[2].replace(b'"step": 3', b'"step": "3"')  # a step that is no int
    lines.insert(4, b'{"step": 4, "spl\n')  # torn JSON
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a metrics record"):
        read_metrics(path)
    capsys.readouterr()
    run(workdir, 7)
    assert f"{path}: dropped 3 damaged lines" in capsys.readouterr().out
    kept = losses(workdir)
    assert sorted(kept) == [1, 4, 5, 6, 7]
    assert all(kept[s] == losses(trained)[s] for s in (1, 4, 5, 6))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b'{"seed": 0, "task": {"name": "da\xfftes"}}', "UnicodeDecodeError"),
        (b'{"seed": 0, "task": {"name": "dates"', "JSONDecodeError"),
        (b"[1, 2]", "holds a list, not a config"),
        (b'{"seed": 0, "task": "dates"}', "its 'task' is not a section"),
    ],
)
def test_a_damaged_config_json_is_named(trained, tmp_path, content, reason):
    workdir = copy_of(trained, tmp_path)
    (workdir / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"config.json is damaged \(") as e:
        run(workdir, 7)
    assert reason in str(e.value) and "delete it to resume without that check" in str(e.value)
    assert (workdir / "config.json").read_bytes() == content  # left for the user to see
    assert steps(workdir / "checkpoints") == [3, 6]


# ------------------------------------------------------------------- unwritable storage


@pytest.mark.parametrize("which", ["workdir", "checkpoints"])
def test_an_unwritable_directory_stops_the_run_before_the_first_step(tmp_path, monkeypatch, which):
    """Simulated: ``os.access`` reports the directory unwritable (root writes anyway)."""
    workdir = tmp_path / "run"
    target = workdir if which == "workdir" else workdir / "checkpoints"
    target.mkdir(parents=True)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == str(target) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(PermissionError, match=rf"{target} is not writable \(no write permission\)"):
        run(workdir, 3)
    assert not (workdir / "metrics.jsonl").exists()  # no step was trained
    assert not (target / "3").exists()


@pytest.mark.parametrize("which", ["workdir", "checkpoints"])
def test_a_file_where_a_directory_goes_is_named(tmp_path, which):
    """Was a bare FileExistsError traceback from mkdir; the command line says it as a
    usage error (exit code 2) before it builds the model."""
    workdir = tmp_path / "run"
    target = workdir if which == "workdir" else workdir / "checkpoints"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a directory")
    with pytest.raises(FileExistsError, match=rf"{target} cannot be created as a directory "
                       r"\(FileExistsError: File exists\); training needs it for"):  # fmt: skip
        run(workdir, 3)
    assert target.read_text() == "not a directory"
    if which == "workdir":
        with pytest.raises(SystemExit) as info:
            train_lib.main(["--config", "copy:small", "--workdir", str(target)])
        assert info.value.code == 2


def busy_threads(before, timeout=5.0):
    """The non-daemon threads started since ``before`` that are still working (each with
    its innermost frame), after up to ``timeout`` seconds. A thread-pool worker waiting
    for its next task is idle: it exits with the process (an event loop's executor, as
    orbax's asyncio loop keeps one, holds such workers between calls)."""

    def working(thread):
        if thread.daemon or not thread.is_alive():
            return None
        frame = sys._current_frames().get(thread.ident)
        if frame is None:
            return None
        code = frame.f_code  # an idle worker's innermost Python frame is _worker itself
        idle = code.co_name == "_worker" and code.co_filename.endswith(
            os.path.join("concurrent", "futures", "thread.py")
        )
        return None if idle else f"{thread.name} in {code.co_name} ({code.co_filename})"

    deadline = time.monotonic() + timeout
    while True:
        busy = [w for t in set(threading.enumerate()) - before if (w := working(t))]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.05)


def test_a_checkpoint_write_failing_mid_run_stops_at_once_keeping_the_last_good_one(
    trained, tmp_path, monkeypatch
):
    """Simulated: from step 9 on, creating a directory in ``checkpoints/`` fails with
    EACCES, as it would for a non-root user after ``chmod a-w checkpoints``."""
    workdir = copy_of(trained, tmp_path)
    directory = str(workdir / "checkpoints")
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        path = os.fspath(path)
        if os.path.dirname(path) == directory and os.path.basename(path)[:1] == "9":
            raise PermissionError(errno.EACCES, "Permission denied (simulated)", path)
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    threads_before = set(threading.enumerate())
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*checkpoints/9") as e:
        run(workdir, 15)
    monkeypatch.undo()
    assert f"the last one, {workdir / 'checkpoints' / '6'}, is intact" in str(e.value)
    before = losses(workdir)
    assert max(before) == 9  # stopped at the failed save, not a save later
    assert steps(workdir / "checkpoints") == [3, 6]
    train_lib.restore_model(config(6), str(workdir), step=6)  # verifies, or raises
    # nothing left waiting on the failed write (orbax's default left threads that held
    # up the process's exit for its 20-minute timeout); idle pool workers are not
    # waiting on anything
    busy = busy_threads(threads_before)
    assert not busy, busy
    # the same command resumes from step 6 once the directory is writable again
    assert run(workdir, 10)["step"] == 10
    after = losses(workdir)
    assert sorted(after) == list(range(1, 11)) and after == {**after, **before}


# ------------------------------------------------------------------- one trainer per workdir

_HOLD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("workdir", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lock = module.WorkdirLock(sys.argv[2]).acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def hold_lock(workdir):
    """A second process holding ``workdir``'s lock (the lock module needs no JAX); it
    has the lock once it has printed its line."""
    module = ROOT / "jattn" / "training" / "workdir.py"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(module), str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_restoring_into_another_layout_is_named_not_called_damage(tmp_path):
    """A state of other dtypes, shapes or arrays was restored (orbax cast it), failed
    its checksums and was called damaged: the training program sets damaged checkpoints
    aside. Now it is a ValueError naming the array; the checkpoints stay where they are."""
    from jattn.training.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "c", max_to_keep=3)
    state = {"w": jnp.ones((2, 3), jnp.float32), "n": jnp.int32(3)}
    for step in (1, 2):
        ckpt.save(step, state)
        ckpt.wait()
    for like, message in (
        ({**state, "w": state["w"].astype(jnp.bfloat16)}, r"holds \['w'\] as float32\[2, 3\], "
         r"but the state to restore into has bfloat16\[2, 3\]"),
        ({**state, "w": jnp.ones((3, 2))}, r"holds \['w'\] as float32\[2, 3\]"),
        ({"w": state["w"]}, r"lacks 1 the checkpoint holds \(\[\"\['n'\]\"\]\)"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ckpt.restore_latest(like)
    assert ckpt.all_steps() == [1, 2]  # nothing set aside
    step, restored, skipped = ckpt.restore_latest({**state, "n": 0})  # a Python int: int32
    assert (step, skipped) == (2, []) and int(restored["n"]) == 3
    for bad in (2.5, -3, "2"):  # 2.5 made a directory "2.5" that no listing counts
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            ckpt.save(bad, state)
    ckpt.close()
    for bad in (0, "2"):  # 0 kept none, "2" was a TypeError from orbax
        with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
            Checkpointer(tmp_path / "d", max_to_keep=bad)


def test_a_second_trainer_is_refused_naming_the_holder_and_a_crashed_one_is_detected(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = hold_lock(workdir)
    try:
        with pytest.raises(
            WorkdirLockedError, match=rf"in use by another trainer \(pid {holder.pid} on "
        ):
            run(workdir, 3)
        assert sorted(p.name for p in workdir.iterdir()) == ["train.lock"]  # nothing written
    finally:
        holder.communicate("", timeout=30)  # a clean exit releases the lock
    with WorkdirLock(workdir) as lock:
        assert lock.stale is None

    crashed = hold_lock(workdir)
    crashed.send_signal(signal.SIGKILL)  # no handler, no release
    crashed.wait(timeout=30)
    with WorkdirLock(workdir) as lock:
        assert lock.stale.startswith(f"pid {crashed.pid} on ")
        with pytest.raises(WorkdirLockedError, match=rf"pid {os.getpid()} on "):
            WorkdirLock(workdir).acquire()  # even from the same process
    assert (workdir / "train.lock").read_text() == ""  # released: no holder on record


def test_without_flock_the_lock_goes_by_the_holders_pid(tmp_path, monkeypatch):
    """File systems without flock (ENOLCK): a live pid on this host holds the lock, a
    dead one is stale."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_flock)
    workdir = tmp_path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    host = socket.gethostname()
    (workdir / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with pytest.raises(WorkdirLockedError, match=rf"pid {os.getppid()} on {host}"):
        WorkdirLock(workdir).acquire()  # a live process holds it
    (workdir / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": host}))
    with WorkdirLock(workdir) as lock:
        assert lock.stale.startswith(f"pid {dead.pid} on {host}")
        assert json.loads((workdir / "train.lock").read_text())["pid"] == os.getpid()
    assert (workdir / "train.lock").read_text() == ""


# --------------------------------------------------------------------- generate under jit

SRC = jnp.asarray([[3, 4, 5, 0], [6, 7, 8, 9]])


def test_generate_inside_a_callers_jit_matches_and_leaves_the_model_intact():
    """Each model captured by the caller's jax.jit (not passed in): flax used to raise
    TraceContextError and leave the model without its attributes. The fix is in the
    models' shared jit wrappers, so beam search on one model and greedy on the others
    cover it (fewer compiles)."""
    seq2seq = Transformer(src_vocab_size=12, tgt_vocab_size=12, num_encoder_layers=1,
                          num_decoder_layers=1, features=16, num_heads=2, mlp_features=32,
                          max_len=8, rngs=nnx.Rngs(0))  # fmt: skip
    want = seq2seq.generate(SRC, max_len=5, beam_size=2)
    got = jax.jit(lambda s: seq2seq.generate(s, max_len=5, beam_size=2))(SRC)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(seq2seq.generate(SRC, max_len=5, beam_size=2), want)

    lm = DecoderLM(12, num_layers=1, features=16, num_heads=2, mlp_features=32, max_len=12,
                   rngs=nnx.Rngs(1))  # fmt: skip
    lengths = jnp.asarray([3, 4])
    want = lm.generate(SRC, lengths, max_new_tokens=4)
    got = jax.jit(lambda p, n: lm.generate(p, n, max_new_tokens=4))(SRC, lengths)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(lm.generate(SRC, lengths, max_new_tokens=4), want)

    rnn = BahdanauSeq2Seq(12, 12, embed_dim=8, hidden=8, rngs=nnx.Rngs(2))
    want = rnn.generate(SRC, max_len=5)
    got = jax.jit(lambda s: rnn.generate(s, max_len=5))(SRC)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rnn.generate(SRC, max_len=5), want)


# ------------------------------------------------------------ writes outside the workdir


def test_write_outside_workdir_is_a_checked_bool_with_a_default():
    cfg = load_config("dates", "small")
    assert cfg.write_outside_workdir is True
    train_lib.validate_config(cfg)
    as_dict = cfg.to_dict()
    del as_dict["write_outside_workdir"]  # configs written before the field existed
    from ml_collections import ConfigDict

    train_lib.validate_config(ConfigDict(as_dict))
    as_dict["write_outside_workdir"] = "no"
    with pytest.raises(ValueError, match="config.write_outside_workdir must be True or False"):
        train_lib.validate_config(ConfigDict(as_dict))


def test_write_outside_workdir_false_writes_nothing_outside_the_workdir(tmp_path):
    """The command line with a fresh HOME: no compilation cache, and matplotlib's font
    cache (written when the heatmaps import it) lands in the workdir."""
    home, workdir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    args = ["num_steps=1", "warmup_steps=0", "checkpoint_every=1"]
    cmd = [sys.executable, "-m", "jattn.train", "--config", "configs/copy.py:small",
           "--workdir", str(workdir), "--config.write_outside_workdir=False",
           "--config.eval.num_samples=0", *[f"--config.train.{a}" for a in args]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(home.iterdir()) == []  # the default config would write ~/.cache/jattn/jax
    assert list((workdir / ".matplotlib").glob("fontlist*.json"))
    assert (workdir / "cross_attention_0.png").exists()
