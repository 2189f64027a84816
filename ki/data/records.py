"""The prepared-frame record: one ArrayRecord record per kept DROID frame.

A record is `ki.msgpack_numpy.packb` of

  {"episode_id": str, "step": int, "episode_length": int,
   "images": {camera: JPEG bytes exactly as stored in RLDS, for the three DROID cameras},
   "state": float32 [8],           joint_position (7) + gripper_position (1)
   "actions": float32 [H, 8],      actions[t : t + H], end-clamped
   "instructions": [str, str, str]}  language_instruction, _2, _3 ('' where missing)

`encode_frame` and `decode_frame` both validate, so a bad record fails where it is written and a
foreign file fails where it is read, each with an error naming the field.
"""

from collections.abc import Mapping
import json
import os
from typing import Any

import numpy as np

from ki import msgpack_numpy
from ki.data import droid

# The prepared dataset's index, written by data_prep.droid_to_arrayrecord beside the shards.
MANIFEST = "manifest.json"
FIELDS = ("episode_id", "step", "episode_length", "images", "state", "actions", "instructions")


def validate_frame(frame: Mapping[str, Any], *, action_horizon: int | None = None) -> None:
  """Raises ValueError naming the first field that breaks the record contract."""
  if not isinstance(frame, Mapping):
    raise ValueError(f"a frame record must be a dict, got {type(frame).__name__}")
  missing = [k for k in FIELDS if k not in frame]
  extra = [k for k in frame if k not in FIELDS]
  if missing or extra:
    raise ValueError(f"frame record fields: missing {missing}, unexpected {extra}")
  if not isinstance(frame["episode_id"], str) or not frame["episode_id"]:
    raise ValueError(f"frame 'episode_id' must be a non-empty str, got {frame['episode_id']!r}")
  for key in ("step", "episode_length"):
    if not isinstance(frame[key], (int, np.integer)) or isinstance(frame[key], bool):
      raise ValueError(f"frame {key!r} must be an int, got {frame[key]!r}")
  if not 0 <= frame["step"] < frame["episode_length"]:
    raise ValueError(
      f"frame 'step' {frame['step']} is outside the episode of length {frame['episode_length']}"
    )
  images = frame["images"]
  if not isinstance(images, Mapping) or sorted(images) != sorted(droid.CAMERA_NAMES):
    names = sorted(images) if isinstance(images, Mapping) else type(images).__name__
    raise ValueError(f"frame 'images' must hold exactly {list(droid.CAMERA_NAMES)}, got {names}")
  for name, data in images.items():
    if not isinstance(data, bytes):
      raise ValueError(f"frame image {name!r} must be encoded bytes, got {type(data).__name__}")
  _check_array(frame, "state", (droid.ACTION_DIM,))
  horizon = frame["actions"].shape[0] if isinstance(frame["actions"], np.ndarray) else None
  if action_horizon is not None and horizon != action_horizon:
    raise ValueError(f"frame 'actions' must have horizon {action_horizon}, got {horizon}")
  _check_array(frame, "actions", (horizon or 0, droid.ACTION_DIM))
  instructions = frame["instructions"]
  if (
    not isinstance(instructions, (list, tuple))
    or len(instructions) != len(droid.INSTRUCTION_KEYS)
    or not all(isinstance(s, str) for s in instructions)
  ):
    raise ValueError(f"frame 'instructions' must be a list of 3 str, got {instructions!r}")


def _check_array(frame: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> None:
  value = frame[key]
  if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != shape:
    got = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else repr(value)
    raise ValueError(f"frame {key!r} must be float32{list(shape)}, got {got}")
  if not np.all(np.isfinite(value)):
    raise ValueError(f"frame {key!r} has non-finite values")


def encode_frame(frame: Mapping[str, Any]) -> bytes:
  """Validates a frame dict and serialises it (msgpack with numpy arrays)."""
  validate_frame(frame)
  frame = dict(frame)
  frame["step"] = int(frame["step"])
  frame["episode_length"] = int(frame["episode_length"])
  frame["instructions"] = list(frame["instructions"])
  return msgpack_numpy.packb(frame)


def decode_frame(data: bytes, *, action_horizon: int | None = None) -> dict[str, Any]:
  """Deserialises and validates one record; the arrays are read-only views of `data`."""
  try:
    frame = msgpack_numpy.unpackb(data)
  except Exception as e:  # msgpack raises several unrelated types for garbage input.
    raise ValueError(f"record is not a msgpack frame: {type(e).__name__}: {e}") from e
  validate_frame(frame, action_horizon=action_horizon)
  return frame


def load_manifest(data_dir: str) -> dict:
  """The manifest of a prepared dataset (counts, settings, shards); errors name what is missing."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{data_dir} is not a prepared dataset: {MANIFEST} is missing")
  with open(path) as f:
    return json.load(f)


def shard_paths(data_dir: str) -> list[str]:
  """The ArrayRecord shards of a prepared dataset, in order, as listed in its manifest."""
  manifest = load_manifest(data_dir)
  paths = [os.path.join(data_dir, shard["path"]) for shard in manifest["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{data_dir}: shards listed in {MANIFEST} are missing: {missing}")
  return paths
