"""LoRA adapters merged into the base weights: openpi's pi0.5 layout, for serving and export.

The adapters themselves live in ki/model/gemma.py (`LoRA`, `Einsum`, `FeedForward`); training keeps
them unmerged (the checkpointed state). `merge` folds every adapter pair into the weight it
adapts, so the result has exactly the leaves of the model without adapters and gives the same
outputs with `without_lora(config)`:

  attention, weight W [..., N, D, H] (q), [..., 2, K, D, H] (kv): W += scale * a @ b per head
  attn_vec_einsum W [..., N, H, D]: the adapter's second einsum sums b over heads (openpi's
    equation "BTL,NLD->BTD"), so W[n] += scale * a[n] @ sum_m b[m]
  MLP gating_einsum [..., 2, D, F] and linear [..., F, D]: W += a @ b (openpi leaves them unscaled)
"""

import dataclasses
import math

import jax.numpy as jnp

from ki.model import params as params_lib


def without_lora(config):
  """The model config that `merge`'s output belongs to: the same model with no adapters."""
  return dataclasses.replace(config, vlm_lora_rank=0, expert_lora_rank=0)


def _scale(config, name: str) -> float:
  lora = config.loras[1 if params_lib.EXPERT_PATTERN.fullmatch(name) else 0]
  return lora.scale


def merge(params: dict, config) -> dict:
  """params (with adapters) -> params of `without_lora(config)` with the adapters folded in."""
  flat = params_lib.flatten(params)
  merged = {name: leaf for name, leaf in flat.items() if not name.endswith(("lora_a", "lora_b"))}
  for name in flat:
    if not name.endswith("lora_a"):
      continue
    a, b = flat[name], flat[name[: -len("a")] + "b"]
    if name.endswith("/lora_a"):  # an attention Einsum: its weight is the sibling "w"
      weight = name[: -len("lora_a")] + "w"
      scale = _scale(config, weight)
      if weight.split("/")[-2].startswith("attn_vec_einsum"):
        delta = jnp.einsum("...nhl,...ld->...nhd", a, b.sum(axis=-3))
      else:
        delta = jnp.einsum("...xl,...ly->...xy", a, b)
      delta = delta * scale
    else:  # an MLP weight: "<weight>_lora_a"
      weight = name[: -len("_lora_a")]
      delta = jnp.einsum("...xl,...ly->...xy", a, b)
    merged[weight] = (merged[weight] + delta.astype(merged[weight].dtype)).astype(
      merged[weight].dtype
    )
  return params_lib.unflatten(merged)


def count(params) -> dict[str, int]:
  """Parameter counts of a tree of arrays or ShapeDtypeStructs: all, and the adapters'."""
  flat = {name: math.prod(leaf.shape) for name, leaf in params_lib.flatten(params).items()}
  return {
    "total": sum(flat.values()),
    "adapters": sum(n for name, n in flat.items() if name.endswith(("lora_a", "lora_b"))),
  }
