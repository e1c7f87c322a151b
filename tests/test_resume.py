"""Interrupted runs resume from their last checkpoint and reproduce the same losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _train_utils import ROOT, load_config, train_losses

import jattn.train as train_lib
from jattn.training import read_metrics
from jattn.training.checkpoint import MetricsLog

# A long schedule (the runs below stop early): every run shares one compiled train step.
OVERRIDES = {"num_steps": 5000, "checkpoint_every": 3, "log_every": 1}


def config(stop_after_steps=0):
    cfg = load_config("dates", "small")
    cfg.train.update(**OVERRIDES, stop_after_steps=stop_after_steps)
    return cfg


def run(workdir, stop_after_steps):
    return train_lib.train_and_evaluate(config(stop_after_steps), str(workdir))


def losses(workdir):
    return train_losses(read_metrics(workdir / "metrics.jsonl"))


def checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_stop_and_resume_gives_the_same_losses(tmp_path):
    """Logged every 2 steps and stopped at 5 (checkpoints at 3 and 5), the resumed run's
    log equals the uninterrupted one's: the same records, the same floats."""
    every2 = dict(OVERRIDES, log_every=2)

    def run2(workdir, stop):
        cfg = load_config("dates", "small")
        cfg.train.update(**every2, stop_after_steps=stop)
        return train_lib.train_and_evaluate(cfg, str(workdir))

    ref = run2(tmp_path / "ref", 10)
    assert ref["interrupted"] == "stop_after_steps" and ref["step"] == 10
    first = run2(tmp_path / "run", 5)
    assert first["step"] == 5 and checkpoints(tmp_path / "run")[-1] == 5
    assert sorted(losses(tmp_path / "run")) == [2, 4]  # no extra record at the stop
    second = run2(tmp_path / "run", 10)
    assert second["step"] == 10
    assert second["train_step_compiles"] == 1
    expected = losses(tmp_path / "ref")
    assert sorted(expected) == [2, 4, 6, 8, 10]
    assert losses(tmp_path / "run") == expected  # exact float equality, each step once


def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path, monkeypatch):
    """A real SIGTERM, sent to this process as step 5's record is logged, stops the run
    after that step with a checkpoint there; the resumed run gives the same losses.

    The signal is sent from the training loop itself (not from a timed watcher thread),
    so the test cannot miss it and train the whole 5000-step schedule; the backstop of
    40 steps bounds it even if the handler were broken.
    """
    workdir = tmp_path / "run"
    write = MetricsLog.write

    def write_then_signal(self, record):
        write(self, record)
        if record["split"] == "train" and record["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    result = run(workdir, 40)
    monkeypatch.undo()
    assert result["interrupted"] == signal.SIGTERM and result["step"] == 5
    assert checkpoints(workdir)[-1] == 5  # saved where it stopped
    assert max(losses(workdir)) == 5
    run(workdir, 9)
    run(tmp_path / "ref", 9)
    assert losses(workdir) == losses(tmp_path / "ref")


@pytest.mark.slow
def test_sigkill_of_the_command_line_run_resumes_from_the_last_periodic_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
    cmd = [
        sys.executable,
        "-m",
        "jattn.train",
        "--config",
        "configs/dates.py:small",
        "--workdir",
        str(workdir),
        "--config.compilation_cache_dir=",
        *args,
    ]
    # stderr to a file, not a pipe nobody reads (a full pipe would stall the child); the
    # child's own backstop of 400 steps bounds it if this loop never kills it.
    cmd.append("--config.train.stop_after_steps=400")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while time.time() < deadline and proc.poll() is None:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
                    break
                time.sleep(0.002)
            alive = proc.poll() is None
            proc.kill()  # SIGKILL: no handler runs
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert alive, (tmp_path / "stderr.txt").read_text()[-3000:]
    logged = max(losses(workdir))
    assert logged >= 7 and checkpoints(workdir), "a periodic checkpoint should exist"
    assert checkpoints(workdir)[-1] <= logged
    # the same run started again resumes; here in-process, stopping a bit later
    result = run(workdir, logged + 3)
    assert result["step"] == logged + 3
    run(tmp_path / "ref", logged + 3)
    assert losses(workdir) == losses(tmp_path / "ref")


def test_metrics_log_keeps_the_records_of_the_saved_states(tmp_path):
    """On resume at step 4 the log keeps train and eval records up to 4 and drops later
    ones and a torn line; an eval at the final step is dropped (the run evaluates again)."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "split": "train", "loss": s} for s in range(1, 7)]
    lines += [{"step": 2, "split": "eval"}, {"step": 4, "split": "eval"}]
    lines += [{"step": 6, "split": "eval"}]
    lines.insert(3, [1, 2])  # valid JSON that is no record (a hand edit) is dropped too
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "spl')
    log = MetricsLog(path, resume_step=4, final_step=10)
    assert log.eval_steps == {2, 4}
    log.write({"step": 5, "split": "train", "loss": 0.5})
    log.close()
    kept = [(r["step"], r["split"]) for r in read_metrics(path)]
    assert kept == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (2, "eval")] + [
        (4, "eval"),
        (5, "train"),
    ]
    MetricsLog(path, resume_step=5, final_step=5).close()
    assert [(r["step"], r["split"]) for r in read_metrics(path)][-2:] == [(4, "eval"), (5, "train")]
    assert {r["split"] for r in read_metrics(path) if r["step"] == 5} == {"train"}


def test_an_evaluation_cut_off_by_the_stop_runs_on_resume(tmp_path):
    """A run stopped after its checkpoint at step 3 but before writing the eval due
    there evaluates step 3 when it resumes; each eval is written once."""
    cfg = load_config("dates", "small")
    cfg.train.update(eval_every=3, stop_after_steps=3)
    train_lib.train_and_evaluate(cfg, str(tmp_path))
    path = tmp_path / "metrics.jsonl"
    records = read_metrics(path)
    (eval3,) = [r for r in records if r["split"] == "eval"]
    assert eval3["step"] == 3
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["split"] == "train"))
    cfg.train.update(stop_after_steps=0)
    train_lib.train_and_evaluate(cfg, str(tmp_path))
    evals = [r for r in read_metrics(path) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[0] == eval3  # the same state, the same metrics
