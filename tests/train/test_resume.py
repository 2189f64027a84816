"""Which config changes a resume accepts (ki/train/resume.py): every field classified, breaking
changes refused naming each field, safe ones returned for the log. The trainer's side (refused
before any restore, nothing called damaged) is in tests/train/test_trainer.py."""

import glob
import importlib
import os

import ml_collections
import pytest

from experiments import droid_ki
from ki.train import config as config_lib
from ki.train import optimizer, resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(
  os.path.splitext(os.path.basename(p))[0]
  for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
  if not p.endswith("__init__.py")
)


def _fields(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_field_of_the_default_config_is_classified():
  unclassified = [f for f in _fields(config_lib.default_config()) if resume.rule_for(f) is None]
  assert not unclassified, f"add these to ki.train.resume.RULES: {unclassified}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_field_of_every_experiment_is_classified(name):
  module = importlib.import_module(f"experiments.{name}")
  for variant in sorted(droid_ki.VARIANTS):
    config = module.get_config(variant)
    unclassified = [f for f in _fields(config) if resume.rule_for(f) is None]
    assert not unclassified, f"{name}:{variant}: add to ki.train.resume.RULES: {unclassified}"


def test_groups_added_later_are_classified_by_their_prefix():
  assert not resume.rule_for("eval.sim.episodes").breaks
  assert not resume.rule_for("eval.sim").breaks
  assert resume.rule_for("model.some_new_switch").breaks
  assert resume.rule_for("data.some_new_setting").breaks
  assert resume.rule_for("nothing.known") is None


def _changed(**changes) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.update_from_flattened_dict(changes)
  return config


def _check(saved, current):
  return resume.check_resumable(
    saved.to_json_best_effort(), current.to_json_best_effort(), "/run/checkpoints/200"
  )


@pytest.mark.parametrize(
  "changes, named",
  [
    # Another model width.
    (
      {"model.vlm_variant": "gemma_300m"},
      ["model.vlm_variant: 'gemma_2b' in the checkpoint, 'gemma_300m' now"],
    ),
    ({"optimizer.ema_decay": 0.999}, ["optimizer.ema_decay: None in the checkpoint, 0.999 now"]),
    ({"optimizer.clip_norm": 0.0}, ["optimizer.clip_norm: 1.0 in the checkpoint, 0.0 now"]),
    (
      {"optimizer.clip": "per_group"},
      ["optimizer.clip: 'global' in the checkpoint, 'per_group' now"],
    ),
    (
      {"optimizer.groups.action_expert.frozen": True},
      ["optimizer.groups.action_expert.frozen: False in the checkpoint, True now"],
    ),
    ({"data.num_workers": 8}, ["data.num_workers: 0 in the checkpoint, 8 now"]),
    ({"seed": 3}, ["seed: 0 in the checkpoint, 3 now"]),
  ],
)
def test_a_breaking_change_is_refused_naming_the_field_and_the_ways_out(changes, named):
  with pytest.raises(resume.ResumeConfigError) as error:
    _check(config_lib.default_config(), _changed(**changes))
  message = str(error.value)
  for line in named:
    assert f"\n  {line} (" in message, message
  assert "put these settings back" in message
  assert "--config.init.kind=ki --config.init.path=/run/checkpoints/200" in message
  assert "damaged" not in message


def test_lora_names_every_field_it_changes():
  lora = config_lib.default_config()
  optimizer.use_lora(lora)
  with pytest.raises(resume.ResumeConfigError) as error:
    _check(config_lib.default_config(), lora)
  message = str(error.value)
  assert "optimizer.group_rules: 'pi05' in the checkpoint, 'pi05_lora' now" in message
  assert "model.vlm_lora_rank: 0 in the checkpoint, 16 now" in message
  # A group the checkpoint does not have is named once, not field by field.
  assert "optimizer.groups.frozen: absent in the checkpoint, present now" in message
  assert "optimizer.groups.frozen.peak_lr" not in message


def test_safe_changes_are_returned_for_the_log():
  saved = config_lib.default_config()
  current = _changed(
    **{
      "total_steps": 200_000,
      "optimizer.groups.vlm.peak_lr": 1e-5,
      "optimizer.groups.vlm.decay_steps": 5_000,
      "optimizer.clip_norm": 0.5,  # still on: the same optimizer state
      "log_every": 10,
      "checkpoint.every": 500,
      "eval.every": 100,
      "eval.vlm_heldout": "/data/heldout.jsonl",
      "model.remat_policy": "none",
      "grad_accum_steps": 4,
    }
  )
  changes = _check(saved, current)
  assert "total_steps: 100000 in the checkpoint, 200000 now" in changes
  assert "optimizer.groups.vlm.peak_lr: 5e-05 in the checkpoint, 1e-05 now" in changes
  assert "optimizer.clip_norm: 1.0 in the checkpoint, 0.5 now" in changes
  assert len(changes) == 10
  assert _check(saved, config_lib.default_config()) == []
  # The EMA's decay may change once it is on.
  ema = _changed(**{"optimizer.ema_decay": 0.999})
  assert _check(ema, _changed(**{"optimizer.ema_decay": 0.99})) == [
    "optimizer.ema_decay: 0.999 in the checkpoint, 0.99 now"
  ]


def test_a_group_added_under_eval_is_safe():
  """A checkpoint written before a new eval group existed resumes with it (the prefix rule)."""
  current = config_lib.default_config()
  current.eval.added_later = ml_collections.ConfigDict(dict(episodes=10, every=0))
  assert _check(config_lib.default_config(), current) == [
    "eval.added_later: absent in the checkpoint, present now"
  ]


def test_a_checkpoint_from_before_the_clip_structure_existed_counts_as_global():
  """Checkpoints written before optimizer.clip existed clipped globally: a run that still does
  resumes from them, one that clips per group (another optimizer state) is refused, saying why."""
  old = config_lib.default_config()
  del old.optimizer["clip"]
  assert "clip" not in old.optimizer
  assert _check(old, config_lib.default_config()) == []
  with pytest.raises(resume.ResumeConfigError) as error:
    _check(old, _changed(**{"optimizer.clip": "per_group"}))
  assert (
    "optimizer.clip: 'global' in the checkpoint, 'per_group' now (where the clip sits in the "
    "optimizer changes the optimizer state's structure; saved before the field existed, when it "
    "was 'global')"
  ) in str(error.value)
