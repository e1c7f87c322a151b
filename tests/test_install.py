"""The built wheel installs and runs the main job from an empty directory, with nothing
of the clone: its configs ship inside the package (``jattn.configs``)."""

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version

import pytest
from _train_utils import ROOT

# The project as the wheel is built from it (no caches, no build outputs of the clone).
_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "jattn", "configs")


def _build_wheel(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"
    src.mkdir()
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    # Offline: the build uses this environment's setuptools (the test extra asks for >= 77).
    major = int(version("setuptools").split(".")[0])
    assert major >= 77, f"setuptools {version('setuptools')}: pip install -e '.[test]' updates it"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("jattn-*.whl")
    return wheel, pip


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_main_job_from_an_empty_directory(tmp_path):
    wheel, pip = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "jattn/py.typed" in names
    configs = {f"jattn/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert {"jattn/configs/__init__.py", "jattn/configs/dates.py"} <= configs <= names
    packages = {p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("jattn/**/__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "jattn-train = jattn.train:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site, empty = tmp_path / "site", tmp_path / "empty"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
                   check=True, timeout=300)  # fmt: skip
    empty.mkdir()
    # The wheel's jattn with this environment's dependencies; PYTHONPATH comes before the
    # editable install of the clone, whose configs/ the run must not need.
    env = dict(os.environ, PYTHONPATH=str(site))
    code = (
        "import sys, jattn, jattn.train\n"
        "print('jattn from', jattn.__file__)\n"
        "jattn.train.main(sys.argv[1:])\n"
    )
    args = ["--config", "dates:small", "--workdir", "run", "--config.compilation_cache_dir=",
            "--config.train.num_steps=2", "--config.train.warmup_steps=1",
            "--config.eval.num_heatmaps=0"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first == f"jattn from {site / 'jattn' / '__init__.py'}", first
    assert "held-out (32 examples) after 2 steps" in proc.stdout
    assert sorted(p.name for p in (empty / "run" / "checkpoints").iterdir()) == ["2"]
    assert sorted(p.name for p in empty.iterdir()) == ["run"]  # nothing else written here
