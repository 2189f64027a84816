"""Per-example transforms: a prepared-frame record (or a VLM example) -> one ki.batch.Batch.

A robot record is the dict of the prepared-frame contract (see ki/data/records.py):
  {"episode_id", "step", "episode_length",
   "images": {"exterior_image_1_left", "exterior_image_2_left", "wrist_image_left": JPEG bytes},
   "state": float32[8], "actions": float32[H_record, 8], "instructions": [str, str, str]}
A VLM record is {"image": image bytes, "prompt": str, "answer": str}.

The output is a ki.batch.Batch without the batch axis (Grain's batching adds it):
  observation.images:      {slot: uint8[S, S, 3]} for each slot in image_keys: the exterior camera
                           in BASE_SLOT, the wrist camera in LEFT_WRIST_SLOT, black elsewhere
  observation.image_masks: {slot: bool[]}  False for the black placeholders
  observation.state:       float32[action_dim]        normalised, zero-padded
  actions:                 float32[H, action_dim]     normalised, zero-padded (zeros for VLM)
  observation.has_actions: bool[]
  observation.tokenized_prompt: int32[L], tokenized_prompt_mask: bool[L], token_ar_mask: int32[L],
  token_loss_mask: bool[L]

Bad input never raises: the transform returns `Dropped(reason)` and a later pipeline stage counts
it (see ki/data/pipeline.py), so one corrupt frame in 20M costs a counter increment, not a run.
Randomness comes only from the `rng` argument, which Grain's `random_map` seeds from
(pipeline seed, element index): the same index always yields the same example.
"""

import dataclasses
from typing import Any

import numpy as np

from ki import batch as batch_lib
from ki.batch import Batch, Observation
from ki.data import droid, normalize
from ki.data import images as image_lib

# Every reason an example can be dropped, in the order of the counts vector carried by batches.
# The trainer logs each as data/dropped/<reason> from a run's first step, zeros included.
DROP_REASONS = (
  "corrupt_image",  # a JPEG that does not decode, or a missing image
  "non_finite",  # NaN or inf in state or actions
  # state/actions of the wrong shape, or a malformed record (a LeRobot parquet that cannot be
  # read or lacks the spec's columns)
  "bad_shape",
  "no_instruction",  # all instructions empty (or an empty VLM prompt/answer)
  "too_long",  # the tokenizer returned None: prompt + FAST tokens exceed max_token_len
  # LeRobot datasets (ki/data/lerobot.py, whose docstring lists the reasons it returns):
  # a damaged mp4, whatever part is missing: it does not open or decode, or ends before the end
  # its own index declares
  "corrupt_video",
  # a readable video with no frame at the row's timestamp, or a row missing from the episode
  "missing_frame",
  "short_episode",  # an episode shorter than the action horizon
  # Only with data.skip_unreadable_records (ki/data/sources.py ArrayRecordShards):
  "unreadable_record",  # a record its shard could not give back (corrupt, truncated, deleted)
)

EXTERIOR_CAMERAS = ("exterior_image_1_left", "exterior_image_2_left")
WRIST_CAMERA = "wrist_image_left"


@dataclasses.dataclass(frozen=True)
class Dropped:
  """Marks an example that was skipped; `reason` is one of DROP_REASONS."""

  reason: str

  def __post_init__(self):
    if self.reason not in DROP_REASONS:
      raise ValueError(f"unknown drop reason {self.reason!r}; expected one of {DROP_REASONS}")


def _pad_last_axis(array: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads the last axis of `array` to `size` (float32)."""
  padding = [(0, 0)] * (array.ndim - 1) + [(0, size - array.shape[-1])]
  return np.pad(array.astype(np.float32), padding)


def _example(
  image_keys: tuple[str, ...],
  cameras: dict[str, np.ndarray],
  tokenized: dict[str, Any],
  *,
  state: np.ndarray,
  actions: np.ndarray,
  has_actions: bool,
) -> Batch:
  """One unbatched Batch: `cameras` fill their slots, the other slots of image_keys are black and
  masked out."""
  shape = next(iter(cameras.values())).shape
  images = {k: cameras[k] if k in cameras else np.zeros(shape, np.uint8) for k in image_keys}
  return Batch(
    observation=Observation(
      images=images,
      image_masks={k: np.bool_(k in cameras) for k in image_keys},
      state=state,
      tokenized_prompt=np.asarray(tokenized["tokenized_prompt"], np.int32),
      tokenized_prompt_mask=np.asarray(tokenized["tokenized_prompt_mask"], bool),
      token_ar_mask=np.asarray(tokenized["token_ar_mask"], np.int32),
      token_loss_mask=np.asarray(tokenized["token_loss_mask"], bool),
      has_actions=np.bool_(has_actions),
    ),
    actions=actions,
  )


@dataclasses.dataclass(frozen=True)
class RobotTransform:
  """Prepared-frame record -> unbatched Batch (or `Dropped`). Use with `random_map`.

  Attributes:
    tokenizer: a ki.tokenizers.prompt.Pi05Tokenizer (`tokenize_robot`).
    norm_stats: {"state": NormStats, "actions": NormStats} (ki.data.normalize) over the
      data_action_dim real dims (computed on delta actions when `delta_action_mask` is set).
    action_dim: the model's action width; state and actions are zero-padded to it.
    action_horizon: H; the record's chunk must hold at least H steps (extra steps are cut).
    data_action_dim: real dims in the data (8 for DROID: 7 joints + gripper); at most action_dim
      (pi05.Config.validate checks it).
    image_keys: the camera slots to produce (the model's image_keys).
    delta_action_mask: per real dim, True where the action becomes relative to the state
      (DROID: 7 x True for the joints, False for the absolute gripper); None keeps absolute.
    augment: apply pi0.5's training augmentation.
    image_size: output side length (224 for SigLIP So400m/14).
    include_actions_in_prompt: pass the actions to the tokenizer for the FAST postfix (KI
      training); False tokenizes the prompt alone.
  """

  tokenizer: Any
  norm_stats: Any
  action_dim: int
  action_horizon: int
  data_action_dim: int = 8
  image_keys: tuple[str, ...] = batch_lib.DROID_SLOTS
  delta_action_mask: tuple[bool, ...] | None = None
  augment: bool = True
  image_size: int = 224
  include_actions_in_prompt: bool = True

  def __post_init__(self):
    if self.delta_action_mask is not None and len(self.delta_action_mask) != self.data_action_dim:
      raise ValueError(
        f"delta_action_mask has {len(self.delta_action_mask)} entries, expected "
        f"data_action_dim={self.data_action_dim}"
      )

  def __call__(self, record: dict[str, Any] | Dropped, rng: np.random.Generator):
    if isinstance(record, Dropped):
      return record
    try:
      state = np.asarray(record["state"])
      actions = np.asarray(record["actions"])
      cameras = record["images"]
      instructions = [text for text in record["instructions"] if text]
    except (KeyError, TypeError, ValueError):
      return Dropped("bad_shape")
    if state.shape != (self.data_action_dim,) or (
      actions.ndim != 2
      or actions.shape[0] < self.action_horizon
      or actions.shape[1] != self.data_action_dim
    ):
      return Dropped("bad_shape")
    if not (np.all(np.isfinite(state)) and np.all(np.isfinite(actions))):
      return Dropped("non_finite")
    if not instructions:
      return Dropped("no_instruction")

    # Draw every random choice up front, in a fixed order, so the example depends only on rng.
    exterior = EXTERIOR_CAMERAS[int(rng.integers(len(EXTERIOR_CAMERAS)))]
    instruction = instructions[int(rng.integers(len(instructions)))]
    augment_rng = rng if self.augment else None
    try:
      base = image_lib.prepare_image(
        cameras[exterior], size=self.image_size, rng=augment_rng, geometric=True
      )
      wrist = image_lib.prepare_image(
        cameras[WRIST_CAMERA], size=self.image_size, rng=augment_rng, geometric=False
      )
    except (image_lib.CorruptImageError, KeyError, TypeError):
      return Dropped("corrupt_image")

    state = state.astype(np.float32)
    actions = actions[: self.action_horizon].astype(np.float32)
    if self.delta_action_mask is not None:
      actions = droid.to_delta_actions(actions, state, self.delta_action_mask)
    state = normalize.quantile_normalize(state, self.norm_stats["state"])
    actions = normalize.quantile_normalize(actions, self.norm_stats["actions"])

    tokenized = self.tokenizer.tokenize_robot(
      instruction, state, actions if self.include_actions_in_prompt else None
    )
    if tokenized is None:
      return Dropped("too_long")
    return _example(
      self.image_keys,
      {batch_lib.BASE_SLOT: base, batch_lib.LEFT_WRIST_SLOT: wrist},
      tokenized,
      state=_pad_last_axis(state, self.action_dim),
      actions=_pad_last_axis(actions, self.action_dim),
      has_actions=True,
    )


@dataclasses.dataclass(frozen=True)
class VlmTransform:
  """VLM co-training record -> unbatched Batch with has_actions=False (or `Dropped`).

  The image goes to the base camera slot; the other slots are black and masked out. State and
  actions are zeros so the batch stacks with robot examples; the tokenizer puts the loss on the
  answer only. With `augment`, the image gets the same augmentation as a robot base camera.
  """

  tokenizer: Any
  action_dim: int
  action_horizon: int
  image_keys: tuple[str, ...] = batch_lib.DROID_SLOTS
  augment: bool = True
  image_size: int = 224

  def __call__(self, record: dict[str, Any] | Dropped, rng: np.random.Generator):
    if isinstance(record, Dropped):
      return record
    try:
      prompt, answer, image_bytes = record["prompt"], record["answer"], record["image"]
    except (KeyError, TypeError):
      return Dropped("bad_shape")
    if not isinstance(prompt, str) or not isinstance(answer, str):
      return Dropped("bad_shape")
    if not prompt or not answer:
      return Dropped("no_instruction")
    try:
      base = image_lib.prepare_image(
        image_bytes, size=self.image_size, rng=rng if self.augment else None, geometric=True
      )
    except (image_lib.CorruptImageError, TypeError):
      return Dropped("corrupt_image")
    tokenized = self.tokenizer.tokenize_vlm(prompt, answer)
    if tokenized is None:
      return Dropped("too_long")
    return _example(
      self.image_keys,
      {batch_lib.BASE_SLOT: base},
      tokenized,
      state=np.zeros((self.action_dim,), np.float32),
      actions=np.zeros((self.action_horizon, self.action_dim), np.float32),
      has_actions=False,
    )
