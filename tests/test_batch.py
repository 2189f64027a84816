"""The batch contract: required fields, pytree behaviour, and fake/abstract batches that fit a model
config."""

import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from ki import batch as batch_lib
from ki.model import pi05
from tests.model.tiny import tiny_config


def test_a_missing_field_is_an_error_naming_it():
  fields = dict(
    images={},
    image_masks={},
    state=np.zeros((1, 2)),
    tokenized_prompt=np.zeros((1, 3), np.int32),
    tokenized_prompt_mask=np.ones((1, 3), bool),
    token_ar_mask=np.zeros((1, 3), np.int32),
    token_loss_mask=np.zeros((1, 3), bool),
  )
  with pytest.raises(TypeError, match="has_actions"):
    batch_lib.Observation(**fields)
  with pytest.raises(TypeError, match="actions"):
    batch_lib.Batch(observation=batch_lib.Observation(**fields, has_actions=np.ones(1, bool)))


def test_fake_batch_has_the_models_shapes_robot_and_vlm_examples():
  config = tiny_config()
  batch = batch_lib.fake_batch(config, 8)
  b, length = 8, config.max_token_len
  obs = batch.observation
  assert set(obs.images) == set(obs.image_masks) == set(config.image_keys)
  for slot in config.image_keys:
    assert obs.images[slot].shape == (b, config.image_size, config.image_size, 3)
    assert obs.images[slot].dtype == np.uint8 and obs.image_masks[slot].dtype == bool
  assert obs.state.shape == (b, config.action_dim) and obs.state.dtype == np.float32
  assert batch.actions.shape == (b, config.action_horizon, config.action_dim)
  assert not batch.actions[..., config.data_action_dim :].any()
  for name, dtype in (
    ("tokenized_prompt", np.int32),
    ("tokenized_prompt_mask", bool),
    ("token_ar_mask", np.int32),
    ("token_loss_mask", bool),
  ):
    assert getattr(obs, name).shape == (b, length) and getattr(obs, name).dtype == dtype, name
  robot = obs.has_actions
  assert robot.any() and not robot.all()
  assert not batch.actions[~robot].any() and not obs.image_masks["left_wrist_0_rgb"][~robot].any()
  # Targets fit max_loss_tokens, every example has some; the same seed gives the same batch.
  loss_tokens = obs.token_loss_mask.sum(axis=1)
  assert loss_tokens.min() > 0 and loss_tokens.max() <= config.max_loss_tokens
  jax.tree.map(np.testing.assert_array_equal, batch, batch_lib.fake_batch(config, 8))
  # Without the FAST loss, only the VLM examples carry loss tokens (as the pipeline makes them).
  flow_only = batch_lib.fake_batch(tiny_config(fast_loss=False), 8).observation
  np.testing.assert_array_equal(flow_only.token_loss_mask.any(axis=1), ~flow_only.has_actions)


def test_batch_is_a_pytree_that_pickles_and_abstract_batch_matches():
  config = tiny_config()
  batch = batch_lib.fake_batch(config, 4)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), batch, batch)
  assert isinstance(stacked, batch_lib.Batch) and stacked.actions.shape[0] == 2
  jax.tree.map(np.testing.assert_array_equal, pickle.loads(pickle.dumps(batch)), batch)
  abstract = batch_lib.abstract_batch(config, 4)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == shapes


def test_the_model_takes_a_fake_batch():
  config = tiny_config()
  batch = batch_lib.fake_batch(config, 4)
  params = jax.eval_shape(lambda: pi05.init_params(config, jax.random.key(0)))
  losses = jax.eval_shape(
    lambda p, b: pi05.compute_losses(p, config, b.observation, b.actions, jax.random.key(0)),
    params,
    batch_lib.abstract_batch(config, 4),
  )
  assert all(x.shape == (4,) for x in losses.values())
  assert batch.observation.tokenized_prompt.max() < config.vocab_size


def test_importing_the_batch_does_not_import_the_model():
  code = "import sys, ki.batch; print('ki.model.pi05' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "False"


def test_global_batch_takes_the_batch_pytree():
  from ki.train import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  host = batch_lib.fake_batch(tiny_config(), 16)
  batch = sharding.global_batch(host, mesh)
  assert isinstance(batch, batch_lib.Batch)
  image = batch.observation.images["base_0_rgb"]
  assert {s.data.shape[0] for s in image.addressable_shards} == {2}
  jax.tree.map(np.testing.assert_array_equal, batch, host)
