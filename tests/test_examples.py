"""The scripts in examples/ run as a reader would run them (a few steps here)."""

import runpy

from _train_utils import ROOT


def test_lm_example_trains_and_completes_held_out_prompts(capsys):
    main = runpy.run_path(str(ROOT / "examples" / "lm.py"))["main"]
    exact = main(["--steps", "3", "--batch", "8"])
    out = capsys.readouterr().out
    assert 0.0 <= exact <= 1.0
    assert "step 3: loss" in out and "held-out exact match" in out
    # five completions shown, each a prompt "... = " followed by the model's answer
    shown = [line for line in out.splitlines() if line.startswith(("  ok ", "  BAD "))]
    assert len(shown) == 5 and all(" = " in line for line in shown)
