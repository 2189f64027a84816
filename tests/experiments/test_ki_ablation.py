"""The KI ablation's configuration (experiments/ki_ablation.py): its arms differ only where they
should, every arm fine-tunes the pretrained VLM as practitioners do, overrides apply to all
alike, and the pretraining fits the runner's budget. The runner itself (python -m ki.ablation):
tests/ablation/test_runner.py."""

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


@pytest.mark.parametrize("size", sorted(ki_ablation.SIZES))
def test_arms_differ_only_in_their_switches(size):
  configs = {
    arm: _flat(
      ki_ablation.arm_config(
        size, arm, init_path="/ckpt/vlm", seed=3, total_steps=100, eval_every=25
      )
    )
    for arm in ki_ablation.ARMS
  }
  reference = configs["ki"]
  for arm, config in configs.items():
    assert set(config) == set(reference), arm
    differing = {k for k in config if config[k] != reference[k]}
    assert differing <= set(ki_ablation.ARM_FIELDS), (arm, differing)
    switches = ki_ablation.ARMS[arm]
    assert config["model.knowledge_insulation"] == switches["knowledge_insulation"]
    assert config["loss.flow_weight"] == switches["flow_weight"]
    assert config["loss.token_weight"] == switches["token_weight"]
    assert bool(config["data.vlm_sources"]) == switches["cotrain"]
    assert config["optimizer.clip"] == switches["clip"]
    # Every arm starts from the same pretrained VLM with a fresh expert of its seed.
    assert (config["init.kind"], config["init.path"], config["init.fresh_expert"]) == (
      "ki",
      "/ckpt/vlm",
      True,
    )
    assert (config["seed"], config["total_steps"], config["eval.every"]) == (3, 100, 25)
    # The VLM fine-tunes at a tenth of its pretraining rate; warm-up except under stress.
    vlm, expert = (
      config["optimizer.groups.vlm.peak_lr"],
      config["optimizer.groups.action_expert.peak_lr"],
    )
    assert vlm == pytest.approx(ki_ablation.SIZES[size]["pretrain_lr"] / 10)
    warmup = config["optimizer.groups.vlm.warmup_steps"]
    assert (warmup == 0) == switches["stress"]
    if switches["stress"]:
      assert expert == pytest.approx(
        ki_ablation.SIZES[size]["expert_lr"] * ki_ablation.STRESS_EXPERT_LR_FACTOR
      )
  # The arms really are different experiments.
  assert (
    configs["ki"]["model.knowledge_insulation"]
    and not configs["joint"]["model.knowledge_insulation"]
  )
  assert configs["ki"]["data.vlm_sources"] != configs["ki_cotrain"]["data.vlm_sources"]
  # Every arm clips per group but the one that keeps openpi's global clip.
  clips = {arm: config["optimizer.clip"] for arm, config in configs.items()}
  assert {arm for arm, clip in clips.items() if clip != "per_group"} == {"ki_global_clip"}
  assert clips["ki_global_clip"] == "global"
  assert {a for a, _ in ki_ablation.COMPARISONS} | {b for _, b in ki_ablation.COMPARISONS} <= set(
    ki_ablation.ARMS
  )


def test_sizes_start_from_their_own_pretrained_vlm(monkeypatch, tmp_path):
  monkeypatch.setenv("KI_CACHE", str(tmp_path))
  for size in ki_ablation.SIZES:
    config = ki_ablation.get_config(f"{size},joint")
    assert config.init.path == str(tmp_path / f"ki_ablation_{size}" / "vlm_pretrain")
    assert config.synthetic_data.dir == str(tmp_path / f"ki_ablation_{size}")
    # The VLM is wider than its expert, as in pi0.5.
    assert ki_ablation.PROBES[size]["robot_frames"] >= 512
  assert ki_ablation.pretrain_workdir("smoke", blind=True).endswith("vlm_pretrain_blind")


def test_overrides_and_cotrain_weight_apply_to_every_arm_alike():
  overrides = runner.parse_overrides(["batch_size=4", "model.dtype=float32"])
  assert overrides == {"batch_size": 4, "model.dtype": "float32"}
  for arm in ki_ablation.ARMS:
    config = ki_ablation.arm_config(
      "medium", arm, init_path="/ckpt/vlm", overrides=overrides, cotrain_weight=0.5
    )
    assert (config.batch_size, config.model.dtype) == (4, "float32")
    assert all(entry["weight"] == 0.5 for entry in config.data.vlm_sources)
  # Overrides win over the schedules the experiment file sets, in the arms and the pretraining.
  lr = {"optimizer.groups.vlm.peak_lr": 1e-5, "batch_size": 4}
  assert ki_ablation.arm_config("smoke", "ki", overrides=lr).optimizer.groups.vlm.peak_lr == 1e-5
  pretrain = ki_ablation.pretrain_config("smoke", overrides=lr)
  assert (pretrain.optimizer.groups.vlm.peak_lr, pretrain.batch_size) == (1e-5, 4)
  with pytest.raises(ValueError, match="key=value"):
    runner.parse_overrides(["batch_size"])


def test_variant_names_an_arm():
  config = ki_ablation.get_config("smoke,flow_only")
  assert config.loss.token_weight == 0.0
  assert ki_ablation.get_config("smoke").model.knowledge_insulation
  with pytest.raises(ValueError, match="arm"):
    ki_ablation.get_config("smoke,no_such_arm")


@pytest.mark.parametrize("blind", [False, True])
def test_pretraining_is_the_vlm_alone(monkeypatch, tmp_path, blind):
  monkeypatch.setenv("KI_CACHE", str(tmp_path))
  config = ki_ablation.pretrain_config("smoke", 12, {"batch_size": 8}, blind=blind)
  assert (config.total_steps, config.batch_size, config.eval.every) == (12, 8, 0)
  assert config.data.robot_weight == 0.0 and config.loss.flow_weight == 0.0
  assert config.optimizer.groups.action_expert.frozen
  assert config.optimizer.groups.vlm.peak_lr == ki_ablation.SIZES["smoke"]["pretrain_lr"]
  (source,) = config.data.vlm_sources
  assert source["path"].endswith("train_blind.jsonl" if blind else "train.jsonl")
