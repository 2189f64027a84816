"""The batch: the one contract between the data pipeline, the server and the model.

`Observation` carries openpi's field names; `Batch` adds the action chunk. Both are
`flax.struct.dataclass`es, so they are pytrees: Grain stacks per-example batches into a batch with
`jax.tree_util`, jit and shardings take them, and they pickle into Grain's worker processes. Every
field is required: a missing one is a TypeError naming it, never a silent default.

Shapes, with B the batch axis (the data pipeline's per-example batches have no B):
  observation.images             {slot: uint8 [B, H, W, 3]} (float32 in [-1, 1] also accepted;
                                 the model converts uint8 itself)
  observation.image_masks        {slot: bool [B]}   False: a black placeholder the model ignores
  observation.state              float32 [B, action_dim]   normalised, zero-padded
  observation.tokenized_prompt   int32 [B, L]
  observation.tokenized_prompt_mask  bool [B, L]
  observation.token_ar_mask      int32 [B, L]   1 = causal (the FAST postfix / a VLM answer)
  observation.token_loss_mask    bool [B, L]    next-token targets
  observation.has_actions        bool [B]       False for VLM co-training examples (no flow loss)
  actions                        float32 [B, H, action_dim]  normalised, zero-padded (zeros for
                                 VLM examples)

The model config is duck-typed here (image_keys, image_size, action_dim, data_action_dim,
action_horizon, max_token_len, max_loss_tokens, vocab_size, fast_loss): ki.model.pi05 imports this
module, not the other way round.
"""

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import numpy as np

# The camera slots the model knows, openpi's names, in prefix order. pi05.Config.image_keys picks
# from them; the data transforms and the server fill them.
CAMERA_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
BASE_SLOT, LEFT_WRIST_SLOT, RIGHT_WRIST_SLOT = CAMERA_SLOTS
# What a DROID frame fills: one exterior camera and one wrist camera (pi0.5 DROID's image_keys).
DROID_SLOTS = (BASE_SLOT, LEFT_WRIST_SLOT)


@flax.struct.dataclass
class Observation:
  """What the model sees (openpi's field names; shapes in the module docstring)."""

  images: dict[str, Any]
  image_masks: dict[str, Any]
  state: Any
  tokenized_prompt: Any
  tokenized_prompt_mask: Any
  token_ar_mask: Any
  token_loss_mask: Any
  has_actions: Any


@flax.struct.dataclass
class Batch:
  """An observation and its target action chunk [B, H, action_dim]."""

  observation: Observation
  actions: Any


def fake_batch(model_config, batch_size: int, seed: int | Sequence[int] = 0) -> Batch:
  """A well-formed numpy batch for `model_config`: the shapes and dtypes the pipeline produces.

  Every fourth example (index 3, 7, ...) is a VLM co-training example: no actions, only the base
  camera, loss on its answer. Robot examples carry a FAST-like postfix with loss when
  model_config.fast_loss (as the pipeline does), none otherwise. Actions are a smooth function of
  the state and the postfix tokens a function of its sign, so both losses can fall. The same
  (config, batch_size, seed) gives the same batch; `seed` may be a sequence of ints.
  """
  rng = np.random.default_rng(seed)
  b, length, horizon = batch_size, model_config.max_token_len, model_config.action_horizon
  action_dim, real_dims = model_config.action_dim, model_config.data_action_dim
  has_actions = np.arange(b) % 4 != 3

  state = np.zeros((b, action_dim), np.float32)
  state[:, :real_dims] = rng.uniform(-1, 1, (b, real_dims))
  state *= has_actions[:, None]
  ramp = np.linspace(0, 1, horizon, dtype=np.float32)[None, :, None]
  actions = (state[:, None, :] * (1 - ramp)).astype(np.float32)

  prompt_len = length // 2
  postfix_len = max(1, min(model_config.max_loss_tokens, length // 4))
  positions = np.arange(length)
  tokens = rng.integers(1, model_config.vocab_size, (b, length)).astype(np.int32)
  targets = 1 + 7 * (state[:, :1] > 0) + (positions[None, :] - prompt_len)
  is_postfix = (positions >= prompt_len) & (positions < prompt_len + postfix_len)
  tokens = np.where(is_postfix, targets % model_config.vocab_size, tokens).astype(np.int32)
  with_postfix = (~has_actions | bool(model_config.fast_loss))[:, None] & is_postfix
  valid = (positions < prompt_len)[None, :] | with_postfix
  tokens = np.where(valid, tokens, 0).astype(np.int32)

  size = model_config.image_size
  images, image_masks = {}, {}
  for slot in model_config.image_keys:
    seen = has_actions | (slot == BASE_SLOT)
    pixels = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    images[slot] = pixels * seen[:, None, None, None].astype(np.uint8)
    image_masks[slot] = seen
  return Batch(
    observation=Observation(
      images=images,
      image_masks=image_masks,
      state=state,
      tokenized_prompt=tokens,
      tokenized_prompt_mask=valid,
      token_ar_mask=with_postfix.astype(np.int32),
      token_loss_mask=with_postfix,
      has_actions=has_actions,
    ),
    actions=actions,
  )


def abstract_batch(model_config, batch_size: int, sharding=None) -> Batch:
  """ShapeDtypeStructs of fake_batch(model_config, batch_size) (placed with `sharding` when
  given), for lowering and compiling without data; allocates one example only."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=sharding),
    fake_batch(model_config, 1),
  )
