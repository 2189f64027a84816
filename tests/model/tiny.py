"""Tiny pi0.5 configurations for tests: small enough to compile in seconds on a CPU."""

import jax

from ki import batch as batch_lib
from ki.model import pi05


def tiny_config(**overrides) -> pi05.Config:
  fields = dict(
    vlm_variant="tiny",
    expert_variant="tiny",
    siglip_variant="mu/16",
    image_keys=batch_lib.DROID_SLOTS,
    # 4 patches of 16 px per camera: small enough that the eager (un-jitted) tests run in seconds.
    image_size=32,
    action_dim=16,
    data_action_dim=6,
    action_horizon=5,
    max_token_len=24,
    max_loss_tokens=8,
    vocab_size=512,
    dtype="float32",
  )
  fields.update(overrides)
  return pi05.Config(**fields).validate()


def tiny_params(config: pi05.Config, seed: int = 0):
  """perturbed(init_params(config)), with the initialiser compiled once rather than run op by op
  (the eager init of even the tiny model takes tens of seconds on a 2-core CPU)."""
  init = jax.jit(pi05.init_params, static_argnums=0)
  return perturbed(init(config, jax.random.key(seed)), jax.random.key(seed + 1))


def perturbed(params, rng, scale=0.05):
  """Fresh params with every leaf nudged, like a trained model's.

  A fresh init has zero residual gates and a zero SigLIP head, which would make some gradients
  vanish for reasons that have nothing to do with insulation.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(
    treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )
