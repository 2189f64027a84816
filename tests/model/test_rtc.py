"""Real-time chunking's pure parts (ki/model/rtc.py): the soft mask and the guidance weight.

sample_actions with a previous chunk is tested on a real (tiny) model's forward pass in
tests/serve/test_rtc.py, through the Policy's own compiled programs: compiling the guided sampler
once more here would cost the suite ~10 s.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki.model import rtc

_prefix_weights = jax.jit(rtc.prefix_weights, static_argnums=(2, 3))
_guidance_weight = jax.jit(rtc.guidance_weight)


def test_prefix_weights_follow_the_paper():
  delay, prefix, horizon = 2, 6, 10
  weights = np.asarray(_prefix_weights(jnp.array([delay]), jnp.array([prefix]), horizon))[0]
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
  linear = _prefix_weights(jnp.array([delay]), jnp.array([prefix]), horizon, "linear")
  np.testing.assert_allclose(linear[0, delay:prefix], [4 / 5, 3 / 5, 2 / 5, 1 / 5], rtol=1e-6)
  zeros = _prefix_weights(jnp.array([delay]), jnp.array([prefix]), horizon, "zeros")
  np.testing.assert_array_equal(zeros[0], [1, 1] + [0] * 8)
  # The delay never reaches past the previous chunk; nothing is guided without one.
  clamped = _prefix_weights(jnp.array([5, 3]), jnp.array([3, 0]), horizon)
  np.testing.assert_array_equal(clamped, [[1, 1, 1] + [0] * 7, [0] * 10])
  with pytest.raises(ValueError, match="schedule"):
    rtc.prefix_weights(jnp.array([1]), jnp.array([2]), horizon, "cosine")


def test_guidance_weight_is_the_papers_in_ki_time():
  beta = 5.0
  for t in (0.1, 0.3, 0.5, 0.7, 0.9):
    tau = 1 - t  # the paper's time: 0 noise, 1 data
    r_squared = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    paper = min(beta, (1 - tau) / (tau * r_squared))
    np.testing.assert_allclose(_guidance_weight(jnp.array([t]), beta), [paper], rtol=1e-5)
  np.testing.assert_allclose(_guidance_weight(jnp.array([0.5]), beta), [2.0])
  np.testing.assert_array_equal(_guidance_weight(jnp.array([1.0, 0.0]), beta), [beta, beta])
