"""The smoke experiment end to end, as `make demo` runs it but shorter: synthetic DROID generated
into a fresh cache, the real Grain pipeline and tokenizers, ki.main in a subprocess; both losses
fall and the checkpoint holds what serving needs."""

import os
import re
import subprocess
import sys

import pytest

from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROGRESS = re.compile(r"step (\d+)/\d+ \| loss [\d.]+ token_ce ([\d.]+) flow_mse ([\d.]+)")


@pytest.mark.slow
def test_smoke_experiment_trains_and_both_losses_fall(tmp_path, compilation_cache):
  # XLA's default optimisation: 120 steps cost more at level 0 than its faster compile saves.
  env = xla_flags.subprocess_env(fast_compile=False, KI_CACHE=str(tmp_path / "cache"))
  command = [
    sys.executable,
    "-m",
    "ki.main",
    "--config=experiments/droid_ki.py:smoke",
    f"--workdir={tmp_path / 'work'}",
    # The smoke model with tests/train/tiny.py's widths and 32 px images: the test is about the
    # whole path (data, tokenizers, both losses, eval, checkpoint), and the smaller program
    # compiles and trains in a fraction of the time. `make demo` trains the smoke widths.
    "--config.model.vlm_variant=tiny",
    "--config.model.expert_variant=tiny",
    "--config.model.image_size=32",
    "--config.total_steps=120",
    "--config.log_every=20",
    "--config.checkpoint.every=60",
    "--config.eval.every=120",
    "--config.eval.max_batches=1",
    f"--config.compilation_cache_dir={compilation_cache}",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  progress = [(int(s), float(ce), float(mse)) for s, ce, mse in _PROGRESS.findall(output)]
  # The first step is logged too (every counter exists from step 1), then every log_every.
  assert [p[0] for p in progress] == [1, 20, 40, 60, 80, 100, 120]
  (_, first_ce, first_mse), (_, last_ce, last_mse) = progress[0], progress[-1]
  assert last_ce < 0.75 * first_ce, progress
  assert last_mse < 0.5 * first_mse, progress
  assert "eval/robot/action_mae" in output
  assert re.search(r"\[1\] .*data/dropped/too_long=0", output), output[-4000:]
  step_dir = tmp_path / "work" / "checkpoints" / "120"
  assets = {p.name for p in (step_dir / "assets").rglob("*") if p.is_file()}
  assert {
    "config.json",
    "norm_stats.json",
    "tokenizer.model",
    "tokenizer.json",
    "processor_config.json",
  } <= assets
  assert (step_dir / "params").is_dir()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "work"))
