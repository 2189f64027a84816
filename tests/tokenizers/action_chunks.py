"""Synthetic normalised action chunks and the sizes the tokenizer tests share."""

import numpy as np

HORIZON = 16
ACTION_DIM = 8
TEXT_VOCAB_SIZE = 400
INSTRUCTIONS = (
  "put the marker in the cup",
  "close the top drawer",
  "pick up the red block and place it on the plate",
  "wipe the table with the towel",
  "move the spoon to the left of the bowl",
  "open the cabinet door",
)


def smooth_chunks(rng: np.random.Generator, count: int) -> np.ndarray:
  """Normalised chunks [count, H, D]: a random offset plus one slow sinusoid per dimension."""
  time = np.linspace(0.0, 1.0, HORIZON)[None, :, None]
  offset = rng.uniform(-0.6, 0.6, (count, 1, ACTION_DIM))
  amplitude = rng.uniform(0.0, 0.3, (count, 1, ACTION_DIM))
  frequency = rng.uniform(0.1, 1.0, (count, 1, ACTION_DIM))
  phase = rng.uniform(0.0, 2 * np.pi, (count, 1, ACTION_DIM))
  return offset + amplitude * np.sin(2 * np.pi * frequency * time + phase)
