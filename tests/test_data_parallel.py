"""Data-parallel training over 8 emulated CPU devices (a separate process: the device
count is fixed when jax starts)."""

import json
import os
import subprocess
import sys
import textwrap

from _train_utils import ROOT

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    import jax
    sys.path.insert(0, sys.argv[1])
    from _train_utils import load_config, train_losses, train_step_compiles
    import jattn.train as train_lib
    from jattn.training import read_metrics

    compiles = train_step_compiles()

    def config(num_devices, stop=0, batch_size=8):
        cfg = load_config("dates", "small")
        cfg.train.update(num_devices=num_devices, num_steps=8, stop_after_steps=stop,
                         batch_size=batch_size)
        cfg.eval.update(num_samples=0, num_heatmaps=0)  # generation is tested elsewhere
        return cfg

    out = {"device_count": jax.device_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, num_devices, stop in [
            ("one", 1, 0), ("all", 0, 0), ("stopped", 0, 4), ("resumed", 0, 0)
        ]:
            workdir = Path(tmp) / ("run" if name in ("stopped", "resumed") else name)
            result = train_lib.train_and_evaluate(config(num_devices, stop), str(workdir))
            out[name] = {
                "losses": train_losses(read_metrics(workdir / "metrics.jsonl")),
                "eval": result.get("eval"),
                "step": result["step"],
            }
    out["step_compiles"] = [
        "Mesh('data': 8" in msg and "spec=P('data',)" in msg for msg in compiles
    ]
    errors = {}
    for name, cfg in [("batch", config(0, batch_size=12)), ("devices", config(9))]:
        try:
            train_lib.validate_config(cfg)
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
    """
)


def test_eight_devices_train_like_one_and_resume():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["device_count"] == 8
    one, all8 = out["one"], out["all"]
    assert sorted(one["losses"]) == sorted(all8["losses"]) == [str(s) for s in range(1, 9)]
    for step, loss in one["losses"].items():  # only the order of the gradient sum differs
        assert abs(all8["losses"][step] - loss) <= 1e-5 * abs(loss), (step, loss)
    assert abs(all8["eval"]["loss"] - one["eval"]["loss"]) <= 1e-5 * one["eval"]["loss"]
    assert all8["eval"]["token_accuracy"] == one["eval"]["token_accuracy"]
    # Stopped at 4 and resumed on 8 devices: the same losses as the uninterrupted run.
    assert out["stopped"]["step"] == 4 and out["resumed"]["step"] == 8
    assert out["resumed"]["losses"] == all8["losses"]
    # One XLA compilation of the train step per mesh (1 and 8 devices; resuming reuses
    # it), and the second splits its batch over the 8 devices.
    assert out["step_compiles"] == [False, True]
    assert out["errors"]["batch"] == (
        "config.train.batch_size=12 must be a multiple of the 8 devices it is split over "
        "(all local devices); change it, or set config.train.num_devices"
    )
    assert out["errors"]["devices"] == (
        "config.train.num_devices=9, but this process has only 8 local cpu device(s)"
    )
