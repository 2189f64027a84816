"""Training and inference give the expert identical inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki.model import pi05
from tests.model.tiny import tiny_config, tiny_params


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_one_step_sampling_equals_the_training_velocity(dtype, tolerance):
  """With t = 1, x_t is the noise, so sample_actions(num_steps=1) = noise - v. Feeding that as the
  target actions makes the training target noise - actions equal v, so flow_mse ~ 0 exactly when
  the training pass (FAST postfix present) computes the same velocity as inference (no postfix)."""
  config = tiny_config(dtype=dtype)
  params = tiny_params(config)
  noise = jax.random.normal(jax.random.key(2), (2, config.action_horizon, config.action_dim))
  inference_obs = pi05.fake_observation(config, 2, with_fast=False)
  # Jitted: the same arithmetic, compiled once instead of dispatched op by op.
  sample = jax.jit(pi05.sample_actions, static_argnums=1, static_argnames="num_steps")
  actions = sample(params, config, inference_obs, None, num_steps=1, noise=noise)
  velocity = noise - actions
  assert float(jnp.mean(jnp.square(velocity))) > 1e-3  # a real, non-trivial velocity

  training_obs = pi05.fake_observation(config, 2, with_fast=True)
  assert int(training_obs.token_ar_mask.sum()) > 0
  losses = jax.jit(pi05.compute_losses, static_argnums=1)(
    params, config, training_obs, actions, None, noise=noise, time=jnp.ones((2,))
  )
  relative = losses["flow_mse"] / jnp.mean(jnp.square(velocity[..., : config.data_action_dim]))
  assert float(jnp.max(relative)) < tolerance


def test_sample_actions_ignores_a_postfix_in_the_observation(config, params):
  noise = jax.random.normal(jax.random.key(2), (1, config.action_horizon, config.action_dim))
  with_fast = pi05.sample_actions(
    params, config, pi05.fake_observation(config, 1), None, noise=noise
  )
  without = pi05.sample_actions(
    params, config, pi05.fake_observation(config, 1, with_fast=False), None, noise=noise
  )
  np.testing.assert_allclose(with_fast, without, atol=1e-5)
