"""Every experiment file loads, validates, and its optimizer rules cover the model's full-size
parameter tree (checked with eval_shape only); every field of every experiment's config can be
overridden through ki.main's --config flag."""

import glob
import importlib
import os
import sys

from absl import flags
import jax
import ml_collections
import pytest

from experiments import droid_ki
from ki import main as ki_main
from ki.model import params as params_lib
from ki.model import pi05
from ki.train import optimizer, state
from ki.train import setup as setup_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
EXPERIMENTS = [p for p in EXPERIMENTS if not p.endswith("__init__.py")]


def _load(path, variant):
  name = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f"experiments.{name}").get_config(variant)


def _group_sizes(params, group_rules) -> dict[str, int]:
  """Parameters per optimizer group."""
  labels = optimizer.label_params(params, params_lib.group_rules(group_rules))
  sizes = {}
  for label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    sizes[label] = sizes.get(label, 0) + leaf.size
  return sizes


def test_there_are_experiments():
  names = {os.path.basename(p) for p in EXPERIMENTS}
  assert {"droid_ki.py", "pi05_flow_only.py", "joint_no_stopgrad.py"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
@pytest.mark.parametrize("variant", sorted(droid_ki.VARIANTS))
def test_experiment_loads_and_validates(path, variant):
  config = _load(path, variant)
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.is_locked
  model_config = setup_lib.training_model(config)
  # The launch command and expectations are documented in the file.
  module_doc = open(path).read().split('"""')[1]
  assert "python -m ki.main --config=experiments/" in module_doc
  # The data config holds no copy of the model's shapes: the pipeline reads them from the model.
  for field in ("action_dim", "action_horizon", "data_action_dim", "image_size"):
    assert field not in config.data, field
  # One knob for the token loss: the model computes it iff it has a weight.
  assert "fast_loss" not in config.model
  assert model_config.fast_loss == (config.loss.token_weight > 0)
  params = (
    jax.eval_shape(lambda: pi05.init_params(model_config, jax.random.PRNGKey(0)))
    if variant != "full"
    else state.abstract_params(model_config)
  )
  optimizer.make_optimizer(config.optimizer, params)


def test_full_variant_matches_the_openpi_parameter_layout():
  config = _load(os.path.join(REPO, "experiments", "droid_ki.py"), "full")
  params = state.abstract_params(pi05.Config(**config.model))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == 3_353_433_872  # reference/openpi_pi05_params.tsv
  sizes = _group_sizes(params, config.optimizer.group_rules)
  assert 300e6 < sizes["action_expert"] < 500e6
  assert sizes["vlm"] > 2.5e9


def test_full_variant_settings_follow_openpi_droid_finetune():
  config = _load(os.path.join(REPO, "experiments", "droid_ki.py"), "full")
  assert config.batch_size == 256
  assert (config.model.action_dim, config.model.data_action_dim) == (32, 8)
  assert config.model.action_horizon == 16
  # openpi's norm, but per optimizer group (openpi's is global): KI's VLM update is the token
  # loss's alone (tests/train/test_clip_insulation.py).
  assert (config.optimizer.clip_norm, config.optimizer.clip) == (1.0, "per_group")
  for group in config.optimizer.groups.values():
    assert (group.b1, group.b2) == (0.9, 0.95)
    assert (group.peak_lr, group.warmup_steps) == (5e-5, 1000)


def test_variants_differ_as_documented():
  experiments = os.path.join(REPO, "experiments")
  flow_only = _load(os.path.join(experiments, "pi05_flow_only.py"), "full")
  assert flow_only.loss.token_weight == 0
  assert flow_only.optimizer.clip == "global"  # plain pi0.5, clipped as openpi does
  no_stopgrad = _load(os.path.join(experiments, "joint_no_stopgrad.py"), "full")
  assert not no_stopgrad.model.knowledge_insulation and no_stopgrad.loss.token_weight == 1.0
  assert no_stopgrad.optimizer.clip == "per_group"  # KI's: the stop-gradient is the difference
  ki = _load(os.path.join(experiments, "droid_ki.py"), "full")
  assert ki.model.knowledge_insulation and ki.loss.token_weight == ki.loss.flow_weight == 1.0


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="smoke"):
    _load(os.path.join(REPO, "experiments", "droid_ki.py"), "tiny")


def test_medium_variant_keeps_pi05_proportions():
  """The GPU-size synthetic variant: the expert narrower than the VLM with the same depth and
  heads (as Gemma 300M against 2B), its own cache and more data than smoke."""
  medium = _load(os.path.join(REPO, "experiments", "droid_ki.py"), "medium")
  smoke = _load(os.path.join(REPO, "experiments", "droid_ki.py"), "smoke")
  model = pi05.Config(**medium.model)
  params = jax.eval_shape(lambda: pi05.init_params(model, jax.random.PRNGKey(0)))
  sizes = _group_sizes(params, medium.optimizer.group_rules)
  assert 50e6 < sizes["vlm"] < 150e6 and 5e6 < sizes["action_expert"] < sizes["vlm"] / 4
  assert medium.synthetic_data.dir != smoke.synthetic_data.dir
  assert medium.synthetic_data.episodes > smoke.synthetic_data.episodes
  assert medium.data.arrayrecord_dir.startswith(medium.synthetic_data.dir)
  assert medium.eval.vlm_heldout.startswith(medium.synthetic_data.dir)


def _leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _other_value(value_type, value):
  """A value of `value_type` different from `value`."""
  if value_type is bool:
    return not value
  if value_type is int:
    return value + 1
  if value_type is float:
    return (value or 0.0) * 2 + 0.5
  if value_type is str:
    return value + "_other"
  if value_type is tuple:
    return tuple(value) + (1,)
  # A bare None: config_flags refuses any override of it ("Type NoneType of field ... is not
  # supported for overriding"), which is what this test is for.
  return 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
@pytest.mark.parametrize("variant", sorted(droid_ki.VARIANTS))
def test_every_field_can_be_overridden_on_the_command_line(path, variant, monkeypatch):
  """Each leaf of the config, overridden at once through ki.main's own --config flag (absl +
  ml_collections config_flags), comes out with the value given. A field whose value is None
  has no type for config_flags ("Type NoneType ... is not supported for overriding"): optional
  fields must be typed placeholders (ml_collections.config_dict.placeholder)."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top

  config = _load(path, variant)
  expected, argv = {}, ["ki.main", f"--config={path}:{variant}"]
  for field, value in _leaves(config):
    value_type = config_path.get_type(field, config)
    expected[field] = _other_value(value_type, value)
    text = repr(expected[field]) if value_type is tuple else str(expected[field])
    argv.append(f"--config.{field}={text}")
  # config_flags reads the overrides from sys.argv, as when ki.main runs.
  monkeypatch.setattr(sys, "argv", argv)
  flag_values = flags.FlagValues()
  holder = ki_main.define_config_flag(flag_values)
  flag_values(argv)
  overridden = dict(_leaves(holder.value))
  assert set(overridden) == set(expected)
  for field, value in expected.items():
    assert overridden[field] == value, field
