"""Parameters for benchmarks, made on the devices without the model's init (batches: ki.batch).

Timings do not depend on the parameter values, and compiling pi05.init_params costs ~20 s even
for the tiny model on a CPU (minutes at full size); drawing random leaves of the right shapes
compiles in a second.
"""

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
