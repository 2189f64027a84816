"""Shapes, dtypes, finiteness, the bf16 path, jit, greedy FAST decoding and config validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki.model import pi05
from tests.model.tiny import tiny_config


def test_jitted_losses_and_sampling_in_bfloat16():
  config = tiny_config(dtype="bfloat16", remat_policy="nothing_saveable")
  params = pi05.init_params(config, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # fp32 parameters
  obs, actions = pi05.fake_observation(config, 3), pi05.fake_actions(config, 3)
  losses = jax.jit(functools.partial(pi05.compute_losses, config=config))(
    params, observation=obs, actions=actions, rng=jax.random.key(1)
  )
  assert set(losses) == {"token_ce", "flow_mse", "token_accuracy", "loss_tokens_truncated"}
  for name in ("token_ce", "flow_mse", "token_accuracy"):
    assert losses[name].shape == (3,) and losses[name].dtype == jnp.float32
    assert np.isfinite(losses[name]).all()
  # A fresh model predicts text at chance: CE near log(vocab).
  np.testing.assert_allclose(losses["token_ce"], np.log(config.vocab_size), rtol=0.2)
  sample = jax.jit(functools.partial(pi05.sample_actions, config=config, num_steps=4))
  actions_out = sample(params, observation=obs, rng=jax.random.key(2))
  assert actions_out.shape == (3, config.action_horizon, config.action_dim)
  assert actions_out.dtype == jnp.float32 and np.isfinite(actions_out).all()


def test_vlm_only_examples_have_no_flow_loss(config, params):
  obs = pi05.fake_observation(config, 2)
  obs = obs.replace(has_actions=jnp.array([True, False]))
  losses = pi05.compute_losses(params, config, obs, pi05.fake_actions(config, 2), jax.random.key(0))
  assert losses["flow_mse"][0] > 0 and losses["flow_mse"][1] == 0
  assert losses["token_ce"][1] > 0


def test_flow_loss_ignores_padded_action_dims(config, params):
  obs, actions = pi05.fake_observation(config, 1), pi05.fake_actions(config, 1)
  # At t = 1 the network's input is the noise alone, so padded target dims change only the target.
  run = functools.partial(
    pi05.compute_losses,
    params,
    config,
    obs,
    rng=jax.random.key(0),
    noise=jax.random.normal(jax.random.key(1), actions.shape),
    time=jnp.ones((1,)),
  )
  garbage = actions.at[..., config.data_action_dim :].set(100.0)
  np.testing.assert_allclose(
    run(actions=garbage)["flow_mse"], run(actions=actions)["flow_mse"], rtol=1e-6
  )


def test_fast_loss_switch():
  config = tiny_config(fast_loss=False)
  params = pi05.init_params(config, jax.random.key(0))
  losses = pi05.compute_losses(
    params,
    config,
    pi05.fake_observation(config, 1),
    pi05.fake_actions(config, 1),
    jax.random.key(0),
  )
  assert losses["token_ce"][0] == 0 and losses["flow_mse"][0] > 0


def test_greedy_fast_decoding_agrees_with_the_training_pass(config, params):
  """Decoded tokens, fed back as the postfix, are each the training pass's argmax (accuracy 1)."""
  num_tokens = 6
  obs = pi05.fake_observation(config, 2, with_fast=False)
  tokens = pi05.sample_fast(params, config, obs, max_tokens=num_tokens)
  assert tokens.shape == (2, num_tokens) and tokens.dtype == jnp.int32
  start = int(obs.tokenized_prompt_mask[0].sum())
  span = slice(start, start + num_tokens)
  teacher = obs.replace(
    tokenized_prompt=obs.tokenized_prompt.at[:, span].set(tokens),
    tokenized_prompt_mask=obs.tokenized_prompt_mask.at[:, span].set(True),
    token_ar_mask=obs.token_ar_mask.at[:, span].set(1),
    token_loss_mask=obs.token_loss_mask.at[:, span].set(True),
  )
  losses = pi05.compute_losses(
    params, config, teacher, pi05.fake_actions(config, 2), jax.random.key(0)
  )
  np.testing.assert_array_equal(losses["token_accuracy"], [1.0, 1.0])


def test_uint8_images_from_the_data_are_what_the_model_sees_in_minus_one_to_one(config, params):
  """The data and the server hand uint8 images; the model maps them to [-1, 1] itself."""
  obs = pi05.fake_observation(config, 2)
  as_uint8 = obs.replace(
    images={k: jnp.round((v + 1.0) * 127.5).astype(jnp.uint8) for k, v in obs.images.items()}
  )
  as_float = as_uint8.replace(
    images={k: v.astype(jnp.float32) / 127.5 - 1.0 for k, v in as_uint8.images.items()}
  )
  noise = jax.random.normal(jax.random.key(1), (2, config.action_horizon, config.action_dim))
  np.testing.assert_array_equal(
    pi05.sample_actions(params, config, as_uint8, None, num_steps=2, noise=noise),
    pi05.sample_actions(params, config, as_float, None, num_steps=2, noise=noise),
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(data_action_dim=40), "data_action_dim 40 > action_dim"),
    (dict(image_keys=("base_0_rgb", "top_camera")), r"image_keys \['top_camera'\]"),
    (dict(vlm_variant="gemma_2b", expert_variant="dummy"), "depth must agree"),
    (dict(siglip_variant="Huge/14"), "Unknown SigLIP size"),
    (dict(dtype="float16"), "dtype"),
    (dict(remat_policy="save_everything_please"), "remat_policy"),
    (dict(max_loss_tokens=64), "max_loss_tokens"),
  ],
)
def test_invalid_configs_are_refused_with_a_reason(overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**overrides)


def test_prefix_lays_out_each_camera_then_the_prompt(config, params):
  """Batched SigLIP over all cameras puts each camera's tokens and mask in its own slot."""
  obs = pi05.fake_observation(config, 2)
  obs = obs.replace(image_masks={**obs.image_masks, "left_wrist_0_rgb": jnp.array([True, False])})
  model = pi05.Pi05(config)
  tokens, input_mask, ar_mask = model.apply({"params": params}, obs, method=pi05.Pi05.embed_prefix)
  per_camera = config.num_image_tokens // len(config.image_keys)

  def siglip(image):
    return model.apply({"params": params}, image, method=lambda m, x: m.PaliGemma.img(x))

  for i, key in enumerate(config.image_keys):
    np.testing.assert_allclose(
      tokens[:, i * per_camera : (i + 1) * per_camera], siglip(obs.images[key]), atol=1e-5
    )
    np.testing.assert_array_equal(input_mask[:, i * per_camera], obs.image_masks[key])
  np.testing.assert_array_equal(input_mask[:, config.num_image_tokens :], obs.tokenized_prompt_mask)
  np.testing.assert_array_equal(ar_mask[:, config.num_image_tokens :], obs.token_ar_mask)
  assert not ar_mask[:, : config.num_image_tokens].any()
