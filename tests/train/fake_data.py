"""A test double for the Grain data iterator: deterministic host batches with get_state/set_state.

Batch k is a pure function of (seed, k), so a restored iterator yields exactly what the original
would have. The batches follow the host-batch contract (openpi Observation names).
"""

import json

import numpy as np


class FakeIterator:
  """Yields host-batch dicts; its state is the index of the next batch (bytes, like Grain's
  DataLoader iterator, so grain's orbax handler saves it unchanged)."""

  def __init__(
    self,
    *,
    batch_size,
    action_dim,
    action_horizon,
    max_token_len,
    vocab_size,
    data_action_dim=8,
    seed=0,
    image_size=224,
    vlm_fraction=0.0,
    process_index=0,
  ):
    self.batch_size = batch_size
    self.action_dim = action_dim
    self.data_action_dim = data_action_dim
    self.action_horizon = action_horizon
    self.max_token_len = max_token_len
    self.vocab_size = vocab_size
    self.seed = seed
    self.image_size = image_size
    self.vlm_fraction = vlm_fraction
    self.process_index = process_index
    self.index = 0
    self.dropped = {"too_long": 0}

  def __iter__(self):
    return self

  def batch(self, index):
    rng = np.random.default_rng([self.seed, self.process_index, index])
    b, h, length = self.batch_size, self.action_horizon, self.max_token_len
    # Actions are a smooth function of the state so that the flow loss can fall.
    state = np.zeros((b, self.action_dim), np.float32)
    state[:, : self.data_action_dim] = rng.uniform(-1, 1, (b, self.data_action_dim))
    ramp = np.linspace(0, 1, h, dtype=np.float32)[None, :, None]
    actions = np.zeros((b, h, self.action_dim), np.float32)
    actions[:, :, : self.data_action_dim] = state[:, None, : self.data_action_dim] * (1 - ramp)
    prompt_len = length // 2
    # Target tokens: a function of the state's sign pattern, so the CE can fall too.
    tokens = rng.integers(1, self.vocab_size, (b, length)).astype(np.int32)
    tokens[:, prompt_len:] = (1 + (state[:, :1] > 0) * 7 + np.arange(length - prompt_len)).astype(
      np.int32
    )
    has_actions = rng.uniform(size=b) >= self.vlm_fraction
    image = rng.integers(0, 255, (b, self.image_size, self.image_size, 3), dtype=np.uint8)
    return {
      "image": {"base_0_rgb": image, "left_wrist_0_rgb": image[:, ::-1]},
      "image_mask": {"base_0_rgb": np.ones(b, bool), "left_wrist_0_rgb": np.ones(b, bool)},
      "state": state,
      "tokenized_prompt": tokens,
      "tokenized_prompt_mask": np.ones((b, length), bool),
      "token_ar_mask": np.concatenate(
        [np.zeros((b, prompt_len), np.int32), np.ones((b, length - prompt_len), np.int32)], 1
      ),
      "token_loss_mask": np.concatenate(
        [np.zeros((b, prompt_len), bool), np.ones((b, length - prompt_len), bool)], 1
      ),
      "has_actions": has_actions,
      "actions": actions * has_actions[:, None, None],
    }

  def __next__(self):
    batch = self.batch(self.index)
    self.index += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state: bytes):
    self.index = json.loads(state.decode())["index"]

  def start_prefetch(self):
    """Called by grain's checkpoint handler after a restore; nothing to prefetch here."""
