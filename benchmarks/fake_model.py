"""Model inputs and parameters for benchmarks, made on the devices without the model's init.

Timings do not depend on the parameter values, and compiling pi05.init_params costs ~20 s even
for the tiny model on a CPU (minutes at full size); drawing random leaves of the right shapes
compiles in a second.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ki.model import pi05


def random_params(config: pi05.Config, seed: int = 0, *, shardings=None):
  """Params of `config`'s shapes and dtypes with pseudo-random values, uniform with the standard
  deviation of a trained model's scale: 1/sqrt(fan-in) for matrices (activations stay O(1)), 0.05
  for vectors. Placed with `shardings` when given.

  The values come from the shader hash frac(sin(x) * 43758.5453): one fused elementwise kernel per
  leaf, which compiles in a fraction of the time of jax.random's generators (~14 s for the tiny
  model's few hundred leaves on a 2-core CPU).
  """
  shapes = jax.eval_shape(lambda: pi05.init_params(config, jax.random.key(0)))
  leaves, treedef = jax.tree.flatten(shapes)

  def draw():
    values = []
    for index, leaf in enumerate(leaves):
      position = jnp.arange(np.prod(leaf.shape, dtype=int), dtype=jnp.float32)
      uniform = jnp.mod(
        jnp.sin(position * 12.9898 + (index + 1000 * seed) * 78.233) * 43758.5453, 1.0
      )
      scale = 1.0 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.05
      # A uniform on [-a, a] has standard deviation a / sqrt(3).
      values.append(
        ((2.0 * uniform - 1.0) * scale * np.sqrt(3.0)).reshape(leaf.shape).astype(leaf.dtype)
      )
    return jax.tree.unflatten(treedef, values)

  return jax.jit(draw, out_shardings=shardings)()


def fake_host_batch(config: pi05.Config, batch_size: int) -> dict[str, Any]:
  """A host batch of the data contract (uint8 images, prompt with a FAST postfix, actions)."""
  observation = pi05.fake_observation(config, batch_size, with_fast=config.fast_loss)
  return {
    "image": {k: np.asarray((v + 1.0) * 127.5, np.uint8) for k, v in observation.images.items()},
    "image_mask": {k: np.asarray(v) for k, v in observation.image_masks.items()},
    "state": np.asarray(observation.state),
    "tokenized_prompt": np.asarray(observation.tokenized_prompt),
    "tokenized_prompt_mask": np.asarray(observation.tokenized_prompt_mask),
    "token_ar_mask": np.asarray(observation.token_ar_mask),
    "token_loss_mask": np.asarray(observation.token_loss_mask),
    "has_actions": np.asarray(observation.has_actions),
    "actions": np.asarray(pi05.fake_actions(config, batch_size)),
  }


def abstract_host_batch(config: pi05.Config, batch_size: int, sharding=None):
  """ShapeDtypeStructs of fake_host_batch(config, batch_size), allocating nothing."""
  one = fake_host_batch(config, 1)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=sharding), one
  )
