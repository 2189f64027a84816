"""A test double for the Grain data iterator: deterministic host batches with get_state/set_state.

Batch k is ki.batch.fake_batch(model, batch_size, seed=(seed, process_index, k)), so a restored
iterator yields exactly what the original would have.
"""

import json

from ki import batch as batch_lib


class FakeIterator:
  """Yields ki.batch.Batch host batches; its state is the index of the next batch (bytes, like
  Grain's DataLoader iterator, so grain's orbax handler saves it unchanged)."""

  def __init__(self, model_config, *, batch_size, seed=0, process_index=0):
    self.model_config = model_config
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.index = 0

  def __iter__(self):
    return self

  def batch(self, index) -> batch_lib.Batch:
    return batch_lib.fake_batch(
      self.model_config, self.batch_size, seed=(self.seed, self.process_index, index)
    )

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
