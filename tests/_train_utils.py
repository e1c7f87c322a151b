"""Helpers shared by the training tests: load a configs/*.py file, read metrics."""

from pathlib import Path

import jattn.train as train_lib

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
    config = train_lib.load_config(ROOT / "configs" / f"{name}.py", arg)
    config.compilation_cache_dir = ""
    config.lock()
    return config


def train_losses(records) -> dict[int, float]:
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics: {steps}"
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def train_step_compiles() -> list[str]:
    """A list that fills with the message of every XLA compilation of a ``train_step``
    from now on (``jax_log_compiles``), to count recompiles."""
    import logging

    import jax

    compiles = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling jit(train_step)"):
                compiles.append(record.getMessage())

    logging.getLogger("jax._src.interpreters.pxla").addHandler(Compiles())
    jax.config.update("jax_log_compiles", True)
    return compiles


def device_env(count: int | None) -> dict[str, str]:
    """This process's environment for a child process with ``count`` emulated CPU
    devices (None: one, the default), keeping the other XLA flags (the test-wide
    compile options, tests/conftest.py)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if count is not None:
        flags.append(f"--xla_force_host_platform_device_count={count}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
