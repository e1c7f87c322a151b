"""Helpers shared by the training tests: load a configs/*.py file, read metrics."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(
        f"configs_{name}", ROOT / "configs" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.compilation_cache_dir = ""
    config.lock()
    return config


def train_losses(records) -> dict[int, float]:
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics: {steps}"
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}
