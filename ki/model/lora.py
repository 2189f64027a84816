"""LoRA adapters merged into the base weights: openpi's pi0.5 layout, for serving and export.

The adapters themselves live in ki/model/gemma.py (`LoRA`, `Einsum`, `FeedForward`); training keeps
them unmerged (the checkpoint's state item). `merge` folds every adapter pair into the weight it
adapts, so the result has exactly the leaves of the model without adapters and gives the same
outputs with `without_lora(config)`; the checkpoint's params item (what ki.serve and openpi read)
holds that merged tree (ki/checkpoint.py):

  attention, weight W [..., N, D, H] (q), [..., 2, K, D, H] (kv): W += scale * a @ b per head
  attn_vec_einsum W [..., N, H, D]: the adapter's second einsum sums b over heads (openpi's
    equation "BTL,NLD->BTD"), so W[n] += scale * a[n] @ sum_m b[m]
  MLP gating_einsum [..., 2, D, F] and linear [..., F, D]: W += a @ b (openpi leaves them unscaled)
"""

import dataclasses
import math

import jax.numpy as jnp

from ki.model import params as params_lib

# openpi's pi0.5 LoRA: gemma_2b_lora LoRAConfig(rank=16, alpha=16) on the VLM, gemma_300m_lora
# (rank=32, alpha=32) on the action expert (pi05.Config fields).
OPENPI_RANKS = dict(
  vlm_lora_rank=16, vlm_lora_alpha=16.0, expert_lora_rank=32, expert_lora_alpha=32.0
)


def without_lora(config):
  """The model config that `merge`'s output belongs to: the same model with no adapters."""
  return dataclasses.replace(config, vlm_lora_rank=0, expert_lora_rank=0)


def _scale(config, name: str) -> float:
  lora = config.loras[1 if params_lib.EXPERT_PATTERN.fullmatch(name) else 0]
  return lora.scale


def has_lora(config) -> bool:
  """Whether the model config has adapters on either stream."""
  return config.vlm_lora_rank > 0 or config.expert_lora_rank > 0


def is_adapter(name: str) -> bool:
  return name.endswith(("lora_a", "lora_b"))


def adapted_weight(adapter: str) -> str:
  """The weight an adapter leaf adapts: an attention Einsum's "<einsum>/lora_a|b" adapts its
  sibling "<einsum>/w", an MLP's "<weight>_lora_a|b" adapts "<weight>"."""
  if adapter.endswith(("/lora_a", "/lora_b")):
    return adapter[: -len("lora_a")] + "w"
  return adapter[: -len("_lora_a")]


def changed_by_merge(names) -> set[str]:
  """Of these parameter names, the ones `merge` drops (the adapters) or changes (the weights
  they adapt); every other leaf passes through `merge` unchanged."""
  adapters = {name for name in names if is_adapter(name)}
  return adapters | {adapted_weight(name) for name in adapters}


def merge(params: dict, config) -> dict:
  """params (with adapters) -> params of `without_lora(config)` with the adapters folded in."""
  flat = params_lib.flatten(params)
  merged = {name: leaf for name, leaf in flat.items() if not is_adapter(name)}
  for name in flat:
    if not name.endswith("lora_a"):
      continue
    a, b = flat[name], flat[name[: -len("a")] + "b"]
    weight = adapted_weight(name)
    if name.endswith("/lora_a"):  # an attention Einsum
      scale = _scale(config, weight)
      if weight.split("/")[-2].startswith("attn_vec_einsum"):
        delta = jnp.einsum("...nhl,...ld->...nhd", a, b.sum(axis=-3))
      else:
        delta = jnp.einsum("...xl,...ly->...xy", a, b)
      delta = delta * scale
    else:  # an MLP weight (openpi leaves these unscaled)
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
    "adapters": sum(n for name, n in flat.items() if is_adapter(name)),
  }
