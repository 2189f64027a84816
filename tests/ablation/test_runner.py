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


def test_steps_to_a_fraction_are_interpolated_between_evaluations():
  steps = np.array([0, 10, 20, 30])
  assert report.steps_to_fraction(steps, np.array([1.0, 0.6, 0.4, 0.5]), 0.5) == 15.0
  assert report.steps_to_fraction(steps, np.array([1.0, 0.8, 0.5, 0.3]), 0.5) == 20.0
  assert np.isnan(report.steps_to_fraction(steps, np.array([1.0, 0.9, 0.8, 0.7]), 0.5))
  assert report.auc(steps, np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(0.5)


def test_paired_bootstrap_interval_covers_the_mean_and_counts_agreeing_seeds():
  paired = report.paired_bootstrap(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.5, 3.5]))
  assert paired["mean"] == pytest.approx(0.5)  # differences 0.5, 1.5, -0.5
  assert paired["low"] <= paired["mean"] <= paired["high"]
  assert (paired["same_sign"], paired["seeds"]) == (2, 3)
  # A difference of the same sign in every seed has an interval that excludes 0.
  clear = report.paired_bootstrap(np.array([2.0, 3.0, 2.5]), np.array([1.0, 1.0, 1.0]))
  assert clear["low"] > 0 and clear["same_sign"] == 3


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
  for name in ("ablation.md", "curves.png", "following.png", "latency.png", "results.json"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  results = json.loads((out / "results.json").read_text())
  # Stage 1: the pretrained VLM and its blind twin are both scored (quick mode does not stop).
  pretrain = results["pretrain"]
  assert pretrain["margin"] == pytest.approx(
    pretrain["vlm"]["accuracy"] - pretrain["blind"]["accuracy"]
  )
  assert set(results["arms"]) == set(experiment.QUICK_ARMS)
  starts = {}
  for arm, runs in results["arms"].items():
    (run,) = runs
    assert sorted(int(s) for s in run["eval"]) == [0, 3, 6], arm
    assert sorted(int(s) for s in run["train"]) == list(range(1, 7)), arm
    for scalars in run["eval"].values():
      assert 0 < scalars["action_mae"] < np.inf
      assert 0 <= scalars["vqa/accuracy"] <= 1 and 0 <= scalars["follow_rate"] <= 1
      # Excluding FAST ids from the softmax can only lower the answer loss.
      assert scalars["vqa/ce_no_fast"] <= scalars["vqa/ce"] + 1e-5
      assert scalars["kv_drift"] >= 0 and scalars["adarms_gate_rms"] >= 0
    assert run["eval"]["0"]["kv_drift"] == 0.0  # step 0 is the pretrained VLM itself
    # The update reaching the VLM is kept for every step.
    assert all(m["update_norm/vlm"] >= 0 for m in run["train"].values())
    starts[arm] = run["eval"]["0"]
  # The stop-gradient: no flow gradient reaches the VLM under KI, some without it once the fresh
  # expert's adaRMS gates have left zero (at step 0 they are zero, as in openpi's init, so the
  # expert's blocks output nothing and no flow gradient reaches the VLM in any arm).
  ends = {arm: runs[0]["eval"]["6"] for arm, runs in results["arms"].items()}
  assert starts["joint"]["adarms_gate_rms"] == 0.0 and starts["joint"]["grad_vlm/flow"] == 0.0
  assert ends["joint"]["adarms_gate_rms"] > 0 and ends["joint"]["grad_vlm/flow"] > 0
  assert ends["ki"]["adarms_gate_rms"] > 0 and ends["ki"]["grad_vlm/flow"] == 0.0
  assert np.isnan(starts["ki"]["grad_cos/flow_vqa"]) or starts["ki"]["grad_cos/flow_vqa"] is None
  # Every arm starts from the same pretrained VLM (same knowledge) and, for one seed, the same
  # fresh expert: the flow-decoded arms predict the same step-0 actions.
  for key in ("vqa/accuracy", "vqa/ce_no_fast"):
    assert starts["ki"][key] == pytest.approx(starts["pi0_fast"][key], rel=1e-5), key
  assert starts["ki"]["action_mae"] == pytest.approx(starts["joint"]["action_mae"], rel=1e-5)
  assert "fast_decode_failures" in starts["pi0_fast"]
  table = (out / "ablation.md").read_text()
  for arm in experiment.QUICK_ARMS:
    assert f"| {arm} |" in table
  assert "blind" in table and "sample_fast" in table and "ki - joint" in table
  assert results["latency"]["fast"]["median_ms"] > 0


def test_a_cached_pretraining_with_other_settings_is_refused_by_name(tmp_path):
  experiment = runner.load_experiment(EXPERIMENT)
  config = experiment.pretrain_config("smoke", 100)
  assets = tmp_path / "checkpoints" / "100" / "assets"
  (tmp_path / "checkpoints" / "100" / "params").mkdir(parents=True)
  assets.mkdir()
  (assets / "config.json").write_text(config.to_json_best_effort())
  runner.check_pretrained(config, str(tmp_path))  # the same settings: reused
  runner.check_pretrained(experiment.pretrain_config("smoke", 300), str(tmp_path))  # longer
  other = experiment.pretrain_config("smoke", 100, {"optimizer.clip_norm": 0.0})
  with pytest.raises(ValueError, match=r"optimizer.clip_norm: 1.0 there, 0.0 now"):
    runner.check_pretrained(other, str(tmp_path))
  runner.check_pretrained(other, str(tmp_path / "nothing_trained_yet"))
