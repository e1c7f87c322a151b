"""Test-wide settings: explicit rank promotion, float64 available for references, and
cheaper XLA compiles."""

import os
import subprocess
import sys

os.environ.setdefault("JATTN_SMALL", "1")
# The tests check values, not speed, on small shapes where XLA's compile time is the
# cost: most of XLA's optimisation passes off halves the suite's CPU time (inherited by
# the notebook kernels and the subprocess tests). The benchmarks, the README's main job
# and JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest ... run the optimised compiles.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Two XLA CPU options cut the compile time again: the older loop emitters instead of
# the MLIR fusion emitters, and one LLVM module per program instead of several for
# parallel code generation (3.4-4.2x on a small model's gradient, 1.6-1.9x on an eager
# op, 1.9x on the suite's CPU time: BENCHMARKS.md). XLA aborts the process on a flag it
# does not know, so a child process tries them first; a jaxlib without them runs the
# default compiles.
FAST_COMPILE_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def _fast_compile_flags() -> None:
    if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") != "1":
        return
    if os.environ.get("JATTN_TEST_FAST_COMPILES") is not None:  # tried (an xdist worker)
        return
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS]).strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    ok = subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0
    if ok:
        os.environ["XLA_FLAGS"] = flags
    os.environ["JATTN_TEST_FAST_COMPILES"] = str(int(ok))


_fast_compile_flags()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
