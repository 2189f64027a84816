"""Tiny data for the pipeline tests, built in-process: JPEG frames written as prepared ArrayRecord
shards, a VLM manifest, a small SentencePiece + FAST tokenizer and matching norm stats.

Sizes are minimal (64x96 JPEGs, 32x32 outputs, horizon 4) so the whole data suite runs in seconds.
"""

import io
import json
import os

from array_record.python import array_record_module
import numpy as np
from PIL import Image

from ki.data import droid, normalize, records
from ki.model import pi05
from ki.tokenizers import fast, prompt

HORIZON = 4
ACTION_DIM = 10  # The model's width: 8 real dims + 2 padding.
IMAGE_SIZE = 32
MAX_TOKEN_LEN = 96
INSTRUCTIONS = ("pick up the red block", "open the drawer", "put the cup on the plate")


def model_config(**overrides) -> pi05.Config:
  """A tiny model whose batches are the sizes above (the pipeline reads its shapes from it)."""
  fields = dict(
    vlm_variant="tiny",
    expert_variant="tiny",
    siglip_variant="mu/16",
    image_size=IMAGE_SIZE,
    action_dim=ACTION_DIM,
    data_action_dim=droid.ACTION_DIM,
    action_horizon=HORIZON,
    max_token_len=MAX_TOKEN_LEN,
    max_loss_tokens=48,
  )
  return pi05.Config(**{**fields, **overrides}).validate()


def jpeg(color, size=(64, 96)) -> bytes:
  """A solid-colour RGB JPEG of `size` (height, width) with a bright marker in one corner."""
  array = np.zeros(size + (3,), np.uint8)
  array[...] = color
  array[:8, :8] = 255
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
  """Lossless image bytes of a uint8 [H, W, 3] array (the decoder accepts any PIL format)."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def frame(episode: int, step: int, *, length: int = 20, instructions=None) -> dict:
  """A valid prepared-frame record whose values encode (episode, step) for identification."""
  rng = np.random.default_rng([episode, step])
  state = rng.uniform(-1, 1, droid.ACTION_DIM).astype(np.float32)
  state[0] = episode * 1000 + step  # A unique tag, readable back from the record.
  actions = (state[None] + 0.01 * np.arange(HORIZON)[:, None]).astype(np.float32)
  return {
    "episode_id": f"episode_{episode}",
    "step": step,
    "episode_length": length,
    "images": {
      "exterior_image_1_left": jpeg((200, 0, 0)),
      "exterior_image_2_left": jpeg((0, 200, 0)),
      "wrist_image_left": jpeg((0, 0, 200)),
    },
    "state": state,
    "actions": actions,
    "instructions": list(instructions or (INSTRUCTIONS[episode % 3], "", INSTRUCTIONS[1])),
  }


def write_shards(directory, frames_or_bytes, *, num_shards: int = 2) -> str:
  """Writes records (frame dicts, encoded, or raw bytes as given) round-robin into shards."""
  os.makedirs(directory, exist_ok=True)
  writers = [
    array_record_module.ArrayRecordWriter(
      os.path.join(directory, f"frames.array_record-{i:05d}-of-{num_shards:05d}"), "group_size:1"
    )
    for i in range(num_shards)
  ]
  for i, item in enumerate(frames_or_bytes):
    data = item if isinstance(item, bytes) else records.encode_frame(item)
    writers[i % num_shards].write(data)
  for writer in writers:
    writer.close()
  return str(directory)


def norm_stats(frames) -> dict:
  """Norm stats of the frames' state and (delta) actions, as compute_norm_stats would give."""
  stats = {"state": normalize.RunningStats(), "actions": normalize.RunningStats()}
  for f in frames:
    stats["state"].update(f["state"][None])
    stats["actions"].update(droid.to_delta_actions(f["actions"], f["state"]))
  return {key: value.get_statistics() for key, value in stats.items()}


def tokenizer(directory, *, max_token_len: int = MAX_TOKEN_LEN) -> prompt.Pi05Tokenizer:
  rng = np.random.default_rng(0)
  texts = [
    prompt.robot_prompt_text(text, rng.uniform(-1, 1, droid.ACTION_DIM))
    for text in INSTRUCTIONS * 30
  ] + ["what colour is the block? red", "where is the cup? left"] * 30
  model = prompt.build_sentencepiece_model(
    texts, os.path.join(directory, "sp.model"), text_vocab_size=300
  )
  time = np.linspace(0, 1, HORIZON)[None, :, None]
  chunks = rng.uniform(-1, 1, (300, 1, droid.ACTION_DIM)) + 0.2 * np.sin(
    3 * time + rng.uniform(0, 6, (300, 1, droid.ACTION_DIM))
  )
  fast_tokenizer = fast.FastTokenizer.fit(chunks, vocab_size=300)
  return prompt.Pi05Tokenizer(
    prompt.PromptTokenizer(model), fast_tokenizer, max_token_len=max_token_len
  )


def vlm_manifest(directory, count: int = 12, *, corrupt: int = 0) -> str:
  """A JSONL manifest with `count` examples; the first `corrupt` images are garbage bytes."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  lines = []
  for i in range(count):
    name = f"images/{i}.jpg"
    with open(os.path.join(directory, name), "wb") as f:
      f.write(b"not a jpeg" if i < corrupt else jpeg((10 * i, 100, 50)))
    lines.append(json.dumps({"image": name, "prompt": f"what is item {i}?", "answer": "red"}))
  path = os.path.join(directory, "vlm.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
