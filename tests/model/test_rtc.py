"""Real-time chunking in sample_actions (ki/model/rtc.py) on the tiny model's real forward pass.

Two programs are compiled once for the module (plain and guided sample_actions); delay, prefix
length and guidance weight are traced, so every case below reuses them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki.model import pi05, rtc
from tests.model import tiny
from tests.serve.conftest import random_params

HORIZON = 8
FLOW_STEPS = 5
BATCH = 4
EXECUTED = 2  # steps of the previous chunk executed when the new observation is taken
PREFIX = HORIZON - EXECUTED


@pytest.fixture(scope="module")
def model():
  config = tiny.tiny_config(action_horizon=HORIZON)
  # Drawn with numpy (shapes from eval_shape): no init program to compile.
  params = random_params(config)
  observation = pi05.fake_observation(config, BATCH, with_fast=False)

  def plain(params, observation, noise):
    return pi05.sample_actions(params, config, observation, None, num_steps=FLOW_STEPS, noise=noise)

  def guided(params, observation, noise, chunk):
    return pi05.sample_actions(
      params, config, observation, None, num_steps=FLOW_STEPS, noise=noise, previous_chunk=chunk
    )

  plain, guided = jax.jit(plain), jax.jit(guided)
  shape = (BATCH, HORIZON, config.action_dim)
  noise_a = jax.random.normal(jax.random.key(1), shape)
  noise_b = jax.random.normal(jax.random.key(2), shape)
  previous = plain(params, observation, noise_a)
  # The previous chunk shifted by the executed steps: row i is its action for the new chunk's i.
  target = jnp.concatenate(
    [previous[:, EXECUTED:], jnp.zeros((BATCH, EXECUTED, config.action_dim))], axis=1
  )
  return dict(
    config=config,
    params=params,
    observation=observation,
    plain=plain,
    guided=guided,
    noise=noise_b,
    target=target,
    naive=plain(params, observation, noise_b),
  )


def _guided(model, delay, max_guidance_weight):
  chunk = rtc.previous_chunk(
    model["target"], delay, PREFIX, max_guidance_weight=max_guidance_weight
  )
  return np.asarray(model["guided"](model["params"], model["observation"], model["noise"], chunk))


def test_prefix_weights_follow_the_paper():
  delay, prefix, horizon = 2, 6, 10
  weights = np.asarray(rtc.prefix_weights(jnp.array([delay]), jnp.array([prefix]), horizon))[0]
  expected = []
  for i in range(horizon):
    if i < delay:
      expected.append(1.0)
    elif i < prefix:
      c = (prefix - i) / (prefix - delay + 1)
      expected.append(c * math.expm1(c) / (math.e - 1))
    else:
      expected.append(0.0)
  np.testing.assert_allclose(weights, expected, rtol=1e-6)
  assert np.all(np.diff(weights[delay:prefix]) < 0) and 0 < weights[prefix - 1] < weights[delay] < 1
  linear = rtc.prefix_weights(jnp.array([delay]), jnp.array([prefix]), horizon, "linear")
  np.testing.assert_allclose(linear[0, delay:prefix], [4 / 5, 3 / 5, 2 / 5, 1 / 5], rtol=1e-6)
  zeros = rtc.prefix_weights(jnp.array([delay]), jnp.array([prefix]), horizon, "zeros")
  np.testing.assert_array_equal(zeros[0], [1, 1] + [0] * 8)
  # The delay never reaches past the previous chunk; nothing is guided without one.
  clamped = rtc.prefix_weights(jnp.array([5, 3]), jnp.array([3, 0]), horizon)
  np.testing.assert_array_equal(clamped, [[1, 1, 1] + [0] * 7, [0] * 10])
  with pytest.raises(ValueError, match="schedule"):
    rtc.prefix_weights(jnp.array([1]), jnp.array([2]), horizon, "cosine")


def test_guidance_weight_is_the_papers_in_ki_time():
  beta = 5.0
  for t in (0.1, 0.3, 0.5, 0.7, 0.9):
    tau = 1 - t  # the paper's time: 0 noise, 1 data
    r_squared = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    paper = min(beta, (1 - tau) / (tau * r_squared))
    np.testing.assert_allclose(rtc.guidance_weight(jnp.array([t]), beta), [paper], rtol=1e-5)
  np.testing.assert_allclose(rtc.guidance_weight(jnp.array([0.5]), beta), [2.0])
  np.testing.assert_array_equal(rtc.guidance_weight(jnp.array([1.0, 0.0]), beta), [beta, beta])


def test_frozen_prefix_is_the_previous_chunk_exactly(model):
  delay = 3
  actions = _guided(model, delay, rtc.DEFAULT_MAX_GUIDANCE_WEIGHT)
  np.testing.assert_array_equal(actions[:, :delay], np.asarray(model["target"])[:, :delay])
  assert np.all(np.isfinite(actions))
  assert not np.allclose(actions[:, delay:], np.asarray(model["naive"])[:, delay:], atol=1e-3)


def test_zero_guidance_weight_is_plain_sampling(model):
  naive = np.asarray(model["naive"])
  np.testing.assert_allclose(_guided(model, 0, 0.0), naive, rtol=1e-5, atol=1e-6)
  delay = 3
  frozen = _guided(model, delay, 0.0)
  np.testing.assert_allclose(frozen[:, delay:], naive[:, delay:], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(frozen[:, :delay], np.asarray(model["target"])[:, :delay])


def test_guidance_joins_the_previous_chunk_more_smoothly_than_naive_switching(model):
  """The robot executes target[:d] (the previous chunk) and then switches to the new chunk at d.
  The discontinuity is how far the new chunk's action at the switch is from the previous chunk's
  own continuation (the random tiny model's chunks are not smooth in time, so the raw step
  new[d] - target[d - 1] would mostly measure the previous chunk's own roughness)."""
  delay = 2
  dims = model["config"].data_action_dim
  target = np.asarray(model["target"])[..., :dims]
  naive = np.asarray(model["naive"])[..., :dims]
  guided = _guided(model, delay, rtc.DEFAULT_MAX_GUIDANCE_WEIGHT)[..., :dims]

  def switch_jump(chunk):  # [B]
    return np.linalg.norm(chunk[:, delay] - target[:, delay], axis=-1)

  weights = np.asarray(rtc.prefix_weights(jnp.array([delay]), jnp.array([PREFIX]), HORIZON))[0]

  def weighted_overlap_error(chunk):  # [B] what the guidance minimises, over [d, P)
    distance = np.linalg.norm(chunk[:, delay:PREFIX] - target[:, delay:PREFIX], axis=-1)
    return (distance * weights[delay:PREFIX]).sum(-1)

  jump_guided, jump_naive = switch_jump(guided), switch_jump(naive)
  # Each of the four noises improves, and by a wide margin on average.
  assert np.all(jump_guided < 0.5 * jump_naive), (jump_guided, jump_naive)
  assert jump_guided.mean() < 0.25 * jump_naive.mean()
  assert weighted_overlap_error(guided).mean() < 0.5 * weighted_overlap_error(naive).mean()
  # The positions past the previous chunk stay free (not pulled to the zero padding).
  assert np.all(np.abs(guided[:, PREFIX:]).max(axis=(1, 2)) > 1e-2)
