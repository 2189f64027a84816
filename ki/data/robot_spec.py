"""The robot spec: which dataset keys feed the model, as plain data in the experiment config.

config.data.robot (a ConfigDict, defaults in `default_config`):
  cameras    ((dataset camera key, model slot), ...): each slot one of ki.batch.CAMERA_SLOTS and
             in model.image_keys; slots the spec leaves empty are black and masked out
  state_key  the numeric feature holding the state [S] (S <= model.action_dim)
  action_key the numeric feature holding the actions [A] (A == model.data_action_dim)
  prompt     where the instruction comes from: "task" (the frame's task string)
The action dims that are relative to the state are data.delta_action_mask (per action dim, by
position; () = all absolute), shared with the DROID path.

`validate` checks the spec against a dataset's features before anything compiles and raises one
error listing every problem and the features that exist. `LeRobotTransform` turns a
ki.data.lerobot frame into the typed ki.batch.Batch with the same steps as the DROID transform:
resize with pad (+ pi0.5's augmentation in training: geometric on non-wrist cameras), delta
actions, quantile normalisation, the pi0.5 prompt (+ FAST postfix), zero-padding to action_dim.
"""

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from ki import batch as batch_lib
from ki.data import droid, normalize, transforms
from ki.data import images as image_lib
from ki.data.transforms import Dropped

PROMPT_SOURCES = ("task",)
NUMERIC_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8")


def default_config() -> ml_collections.ConfigDict:
  """The spec's fields; LIBERO's keys as published for openpi by default."""
  return ml_collections.ConfigDict(
    dict(
      cameras=(("image", batch_lib.BASE_SLOT), ("wrist_image", batch_lib.LEFT_WRIST_SLOT)),
      state_key="state",
      action_key="actions",
      prompt="task",
    )
  )


class RobotSpecError(ValueError):
  """The robot spec does not fit the dataset or the model; the message lists every problem."""


def _vector_size(feature: dict[str, Any]) -> int | None:
  shape = list(feature.get("shape") or [])
  return int(shape[0]) if len(shape) == 1 else None


def validate(spec, dataset, model_config, *, delta_action_mask=()) -> None:
  """Checks the robot spec against `dataset` (ki.data.lerobot.LeRobotDataset) and the model.

  Raises:
    RobotSpecError: one message with every problem and the dataset's features.
  """
  features = dataset.features
  problems = []
  slots = []
  for entry in spec.cameras:
    if len(entry) != 2:
      problems.append(f"cameras entry {entry!r} is not a (dataset key, model slot) pair")
      continue
    key, slot = entry
    slots.append(slot)
    if key not in features:
      problems.append(f"camera {key!r} is not a feature of the dataset")
    elif features[key].get("dtype") not in ("video", "image"):
      problems.append(f"camera {key!r} has dtype {features[key].get('dtype')!r}, not video/image")
    elif len(features[key].get("shape") or []) != 3:
      problems.append(f"camera {key!r} has shape {features[key].get('shape')}, expected [H, W, C]")
    if slot not in batch_lib.CAMERA_SLOTS:
      problems.append(f"camera {key!r} maps to {slot!r}, not a slot {batch_lib.CAMERA_SLOTS}")
    elif slot not in model_config.image_keys:
      problems.append(f"camera {key!r} maps to {slot!r}, not in model.image_keys")
  if not spec.cameras:
    problems.append("cameras is empty: the model needs at least one camera")
  duplicates = sorted({s for s in slots if slots.count(s) > 1})
  if duplicates:
    problems.append(f"slots {duplicates} are filled by more than one camera")
  sizes = {}
  for field in ("state_key", "action_key"):
    key = spec[field]
    feature = features.get(key)
    if feature is None:
      problems.append(f"{field} {key!r} is not a feature of the dataset")
    elif feature.get("dtype") not in NUMERIC_DTYPES or _vector_size(feature) is None:
      problems.append(
        f"{field} {key!r} must be a numeric vector, is {feature.get('dtype')} "
        f"{feature.get('shape')}"
      )
    else:
      sizes[field] = _vector_size(feature)
  if "state_key" in sizes and sizes["state_key"] > model_config.action_dim:
    problems.append(
      f"state {spec.state_key!r} has {sizes['state_key']} dims > model.action_dim "
      f"{model_config.action_dim}"
    )
  if "action_key" in sizes:
    if sizes["action_key"] > model_config.action_dim:
      problems.append(
        f"actions {spec.action_key!r} have {sizes['action_key']} dims > model.action_dim "
        f"{model_config.action_dim}"
      )
    if sizes["action_key"] != model_config.data_action_dim:
      problems.append(
        f"actions {spec.action_key!r} have {sizes['action_key']} dims but "
        f"model.data_action_dim is {model_config.data_action_dim}"
      )
  mask = tuple(delta_action_mask or ())
  if mask:
    if len(mask) != model_config.data_action_dim:
      problems.append(
        f"data.delta_action_mask has {len(mask)} entries, expected model.data_action_dim "
        f"{model_config.data_action_dim}"
      )
    needed = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    if "state_key" in sizes and needed > sizes["state_key"]:
      problems.append(
        f"data.delta_action_mask makes action dim {needed - 1} relative to the state, which "
        f"has only {sizes['state_key']} dims"
      )
  if spec.prompt not in PROMPT_SOURCES:
    problems.append(f"prompt {spec.prompt!r} is not one of {PROMPT_SOURCES}")
  if problems:
    listing = "\n  - ".join(problems)
    raise RobotSpecError(
      f"data.robot does not fit the LeRobot dataset {dataset.root} ({dataset.version}), "
      f"{len(problems)} problem(s):\n  - {listing}\nThe dataset's features: "
      f"{dataset.describe_features()}"
    )


def _prepare(array: np.ndarray, size: int, rng, geometric: bool) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: resize with pad, or pi0.5's augmentation."""
  image = Image.fromarray(array)
  if rng is not None and geometric:
    image = image_lib.jitter_colour(image_lib.resize_crop_rotate(image, size, rng), rng)
  else:
    image = image_lib.resize_with_pad(image, size, size)
    if rng is not None:
      image = image_lib.jitter_colour(image, rng)
  return np.asarray(image, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class LeRobotTransform:
  """ki.data.lerobot frame -> unbatched Batch (or Dropped). Use with `random_map`.

  Attributes: as transforms.RobotTransform, plus `cameras` ((dataset key, slot), ...) from the
  spec; norm_stats cover the real dims of state [S] and actions [A].
  """

  tokenizer: Any
  norm_stats: Any
  cameras: tuple[tuple[str, str], ...]
  action_dim: int
  action_horizon: int
  data_action_dim: int
  image_keys: tuple[str, ...]
  delta_action_mask: tuple[bool, ...] | None = None
  augment: bool = True
  image_size: int = 224
  include_actions_in_prompt: bool = True

  def __call__(self, record, rng: np.random.Generator):
    if isinstance(record, Dropped):
      return record
    state = np.asarray(record["state"], np.float32)
    actions = np.asarray(record["actions"], np.float32)
    if actions.shape != (self.action_horizon, self.data_action_dim) or state.ndim != 1:
      return Dropped("bad_shape")
    if not (np.all(np.isfinite(state)) and np.all(np.isfinite(actions))):
      return Dropped("non_finite")
    augment_rng = rng if self.augment else None
    cameras = {}
    for key, slot in self.cameras:
      cameras[slot] = _prepare(
        record["images"][key], self.image_size, augment_rng, geometric="wrist" not in slot
      )
    if self.delta_action_mask:
      actions = droid.to_delta_actions(actions, state, self.delta_action_mask)
    state = normalize.quantile_normalize(state, self.norm_stats["state"])
    actions = normalize.quantile_normalize(actions, self.norm_stats["actions"])
    tokenized = self.tokenizer.tokenize_robot(
      record["prompt"], state, actions if self.include_actions_in_prompt else None
    )
    if tokenized is None:
      return Dropped("too_long")
    return transforms._example(  # pylint: disable=protected-access
      self.image_keys,
      cameras,
      tokenized,
      state=transforms._pad_last_axis(state, self.action_dim),  # pylint: disable=protected-access
      actions=transforms._pad_last_axis(actions, self.action_dim),  # pylint: disable=protected-access
      has_actions=True,
    )
