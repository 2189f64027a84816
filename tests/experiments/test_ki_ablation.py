"""The KI ablation's configuration (experiments/ki_ablation.py): its arms differ only where they
should, overrides apply to all alike, and the pretraining fits the runner's budget. The runner
itself (python -m ki.ablation): tests/ablation/test_runner.py."""

import ml_collections
import pytest

from experiments import ki_ablation
from ki.ablation import runner


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
    assert config["loss.token_weight"] == (1.0 if switches["token_loss"] else 0.0)
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
  overrides = runner.parse_overrides(
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
    runner.parse_overrides(["batch_size"])


def test_variant_names_an_arm():
  config = ki_ablation.get_config("smoke,flow_only")
  assert config.loss.token_weight == 0.0
  assert ki_ablation.get_config("smoke").model.knowledge_insulation
  with pytest.raises(ValueError, match="arm"):
    ki_ablation.get_config("smoke,no_such_arm")


def test_pretraining_fits_the_budget_with_the_same_overrides(monkeypatch, tmp_path):
  monkeypatch.setenv("KI_CACHE", str(tmp_path))
  config = ki_ablation.pretrain_config("smoke", 12, {"batch_size": 8})
  assert (config.total_steps, config.batch_size, config.eval.every) == (12, 8, 0)
  assert config.data.robot_weight == 0.0 and config.loss.flow_weight == 0.0
  assert all(group.decay_steps == 12 for group in config.optimizer.groups.values())
  assert ki_ablation.pretrain_workdir("smoke") == str(tmp_path / "smoke" / "vlm_pretrain")
  assert ki_ablation.PRETRAIN_STEPS["smoke"] > 0
