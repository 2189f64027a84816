"""The KI ablation runner (python -m ki.ablation): it loads the experiment file by path, its
summary, and the whole experiment (synthetic data, VLM pretraining, two arms, latency, table,
plots) in quick mode. The arms' configs: tests/experiments/test_ki_ablation.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ki.ablation import report, runner
from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENT = os.path.join(REPO, runner.DEFAULT_EXPERIMENT)


def test_loads_the_experiment_file_by_path():
  experiment = runner.load_experiment(EXPERIMENT)
  assert set(experiment.QUICK_ARMS) <= set(experiment.ARMS)
  assert set(experiment.SIZE_DEFAULTS) <= set(experiment.PRETRAIN_STEPS)
  config = experiment.arm_config("smoke", "flow_only", init_path="/ckpt/vlm")
  assert config.loss.token_weight == 0.0 and config.init.path == "/ckpt/vlm"
  # Loaded from its path, not imported as experiments.ki_ablation by the runner.
  assert experiment.__name__ == "ki_ablation" and experiment.__file__ == EXPERIMENT
  with pytest.raises(FileNotFoundError, match="no_such_experiment.py"):
    runner.load_experiment(os.path.join(REPO, "experiments", "no_such_experiment.py"))


def test_unknown_arm_is_a_usage_error(capsys):
  with pytest.raises(SystemExit):
    runner.main([f"--experiment={EXPERIMENT}", "--out=/nonexistent", "--arms=ki,no_such_arm"])
  assert "unknown arms ['no_such_arm']" in capsys.readouterr().err


def test_steps_to_threshold_is_the_first_eval_at_or_below_it():
  steps = np.array([0, 10, 20, 30])
  mae = np.array([[1.0, 0.6, 0.4, 0.5], [1.0, 0.9, 0.8, 0.7]])
  reached = report.steps_to_threshold(steps, mae, 0.5)
  assert reached[0] == 20 and np.isnan(reached[1])


@pytest.mark.slow
def test_quick_ablation_writes_its_table_and_plots(tmp_path, compilation_cache):
  env = xla_flags.subprocess_env()
  out = tmp_path / "ablation"
  command = [
    sys.executable,
    "-m",
    "ki.ablation",
    f"--out={out}",
    "--quick",
    # tests/train/tiny.py's widths and 32 px images for every stage: the test is about the
    # runner's plumbing, and the smaller programs compile in a fraction of the time.
    "--override=model.vlm_variant=tiny",
    "--override=model.expert_variant=tiny",
    "--override=model.image_size=32",
    f"--cache={tmp_path / 'cache'}",
    f"--compilation_cache={compilation_cache}",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  experiment = runner.load_experiment(EXPERIMENT)
  for name in ("ablation.md", "curves.png", "latency.png", "results.json"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  results = json.loads((out / "results.json").read_text())
  assert set(results["arms"]) == set(experiment.QUICK_ARMS)
  starts = {}
  for arm, runs in results["arms"].items():
    (run,) = runs
    eval_steps = sorted(int(s) for s in run["eval"])
    assert eval_steps == [0, 3, 6], arm
    for scalars in run["eval"].values():
      assert 0 < scalars["eval/robot/action_mae"] < np.inf
      assert 0 <= scalars["eval/robot/fast_accuracy"] <= 1
      assert np.isfinite(scalars["eval/vlm/text_ce"])
      # Exact match needs every answer token right, so it never exceeds token accuracy.
      assert scalars["eval/vlm/text_exact_match"] <= scalars["eval/vlm/text_accuracy"] + 1e-6
    starts[arm] = run["eval"]["0"]
  # Both arms start from the same pretrained VLM: the stop-gradient changes no forward value.
  first, second = starts.values()
  for key in ("eval/vlm/text_ce", "eval/robot/action_mae", "eval/robot/fast_accuracy"):
    assert first[key] == pytest.approx(second[key], rel=1e-4), key
  table = (out / "ablation.md").read_text()
  for arm in experiment.QUICK_ARMS:
    assert f"| {arm} |" in table
  assert "sample_fast" in table and "steps to threshold" in table
  assert results["latency"]["fast"]["median_ms"] > 0
