"""The KI ablation (experiments/ki_ablation.py): its arms differ only where they should, and the
whole experiment (synthetic data, VLM pretraining, two arms, table, plots) runs in quick mode."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from experiments import ki_ablation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


@pytest.mark.parametrize("size", ["smoke", "medium", "full"])
def test_arms_differ_only_in_the_insulation_switches(size):
  configs = {
    arm: _flat(
      ki_ablation.arm_config(
        size, arm, init_path="/ckpt/vlm", seed=3, total_steps=100, eval_every=25
      )
    )
    for arm in ki_ablation.ARMS
  }
  reference = configs["ki_cotrain"]
  for arm, config in configs.items():
    assert set(config) == set(reference), arm
    differing = {k for k in config if config[k] != reference[k]}
    assert differing <= set(ki_ablation.ARM_FIELDS), (arm, differing)
    switches = ki_ablation.ARMS[arm]
    assert config["model.knowledge_insulation"] == switches["knowledge_insulation"]
    assert config["model.fast_loss"] == switches["fast_loss"]
    assert config["loss.fast_weight"] == (1.0 if switches["fast_loss"] else 0.0)
    assert bool(config["data.vlm_sources"]) == (switches["cotrain"] and size != "full")
    # Every arm starts from the same pretrained VLM, with the same seed and budget.
    assert (config["init.kind"], config["init.path"]) == ("ki", "/ckpt/vlm")
    assert (config["seed"], config["total_steps"], config["eval.every"]) == (3, 100, 25)
  # The arms really are different experiments.
  insulation = {arm: c["model.knowledge_insulation"] for arm, c in configs.items()}
  assert insulation["ki"] and not insulation["joint"]
  if size != "full":  # full has co-training data only when its path is given
    assert configs["ki"]["data.vlm_sources"] != configs["ki_cotrain"]["data.vlm_sources"]


def test_synthetic_sizes_start_from_their_own_pretrained_vlm(monkeypatch, tmp_path):
  monkeypatch.setenv("KI_CACHE", str(tmp_path))
  for size in ki_ablation.SIZE_DEFAULTS:
    config = ki_ablation.get_config(f"{size},joint")
    assert config.init.path == str(tmp_path / size / "vlm_pretrain")
    assert config.synthetic_data.dir == str(tmp_path / size)
    # Held-out evaluation sees at least 128 robot frames at every size.
    assert config.eval.batch_size * config.eval.max_batches >= 128


def test_overrides_apply_to_every_arm_alike():
  overrides = ki_ablation.parse_overrides(
    ["batch_size=8", "eval.batch_size=8", "data.num_workers=0", "model.dtype=float32"]
  )
  assert overrides == {
    "batch_size": 8,
    "eval.batch_size": 8,
    "data.num_workers": 0,
    "model.dtype": "float32",
  }
  for arm in ki_ablation.ARMS:
    config = ki_ablation.arm_config("medium", arm, init_path="/ckpt/vlm", overrides=overrides)
    assert (config.batch_size, config.data.num_workers, config.model.dtype) == (8, 0, "float32")
    # Derived after the overrides: still at least 128 held-out robot frames.
    assert config.eval.batch_size * config.eval.max_batches >= 128
  with pytest.raises(ValueError, match="key=value"):
    ki_ablation.parse_overrides(["batch_size"])


def test_variant_names_an_arm():
  config = ki_ablation.get_config("smoke,flow_only")
  assert not config.model.fast_loss and config.loss.fast_weight == 0.0
  assert ki_ablation.get_config("smoke").model.knowledge_insulation
  with pytest.raises(ValueError, match="arm"):
    ki_ablation.get_config("smoke,no_such_arm")


def test_steps_to_threshold_is_the_first_eval_at_or_below_it():
  steps = np.array([0, 10, 20, 30])
  mae = np.array([[1.0, 0.6, 0.4, 0.5], [1.0, 0.9, 0.8, 0.7]])
  reached = ki_ablation.steps_to_threshold(steps, mae, 0.5)
  assert reached[0] == 20 and np.isnan(reached[1])


@pytest.mark.slow
def test_quick_ablation_writes_its_table_and_plots(tmp_path, request):
  # The compiled programs persist in pytest's cache folder, as the trainer tests' do.
  compilation_cache = request.config.cache.mkdir("ki_jax_compilation_cache")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "ablation"
  command = [
    sys.executable,
    "-m",
    "experiments.ki_ablation",
    f"--out={out}",
    "--quick",
    f"--cache={tmp_path / 'cache'}",
    f"--compilation_cache={compilation_cache}",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  for name in ("ablation.md", "curves.png", "latency.png", "results.json"):
    assert (out / name).stat().st_size > 0, name
  with open(out / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  results = json.loads((out / "results.json").read_text())
  assert set(results["arms"]) == set(ki_ablation.QUICK_ARMS)
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
  for arm in ki_ablation.QUICK_ARMS:
    assert f"| {arm} |" in table
  assert "sample_fast" in table and "steps to threshold" in table
  assert results["latency"]["fast"]["median_ms"] > 0
