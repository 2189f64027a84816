"""DROID episode logic shared by the offline preparation job and the streaming reader.

Everything here works on one episode held as numpy arrays (the `steps` of an RLDS episode stacked
along time, T steps) so that both readers apply exactly the same rules:

- the success filter (openpi keeps episodes whose `file_path` contains "success");
- openpi's idle rule, which turns an episode's joint velocities into `[start, end)` keep-ranges, or
  the same ranges loaded from openpi's published keep-ranges JSON;
- the 8-dim state and action vectors and end-clamped action chunks;
- joint actions as deltas from the current state (gripper absolute), used for normalisation
  statistics, training and serving alike.

The facts behind the rules are in shared/reference/droid_rlds.md.
"""

from collections.abc import Mapping, Sequence
import json
import os

import numpy as np

CONTROL_HZ = 15
IMAGE_SHAPE = (180, 320, 3)
CAMERA_NAMES = ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left")
INSTRUCTION_KEYS = ("language_instruction", "language_instruction_2", "language_instruction_3")
NUM_JOINTS = 7
# State and actions: 7 joints + 1 gripper.
ACTION_DIM = NUM_JOINTS + 1
ACTION_SPACES = ("joint_position", "joint_velocity")

# openpi's idle rule (the rule behind its published keep-ranges for DROID 1.0.1).
IDLE_VELOCITY_CHANGE = 1e-3
MIN_IDLE_RUN = 7
MIN_KEPT_RANGE = 16
DROP_LAST_FRAMES = 10

# Joints are relative to the current state, the gripper stays absolute.
DEFAULT_DELTA_ACTION_MASK = (True,) * NUM_JOINTS + (False,)


def is_success(file_path: str) -> bool:
  """openpi's success filter: the trajectory file lives under a `success` folder."""
  return "success" in file_path


def episode_key(recording_folderpath: str, file_path: str) -> str:
  """The key of an episode in openpi's keep-ranges JSON; also our record's `episode_id`."""
  return f"{recording_folderpath}--{file_path}"


def idle_steps(joint_velocity: np.ndarray) -> np.ndarray:
  """Which steps are idle: every joint's velocity changed by less than 1e-3 since the last step.

  Args:
    joint_velocity: [T, 7] commanded joint velocities (`action_dict/joint_velocity`).

  Returns:
    bool [T]. Step 0 has no previous step and is never idle.
  """
  joint_velocity = np.asarray(joint_velocity, np.float64)
  if joint_velocity.ndim != 2:
    raise ValueError(f"joint_velocity must be [T, joints], got shape {joint_velocity.shape}")
  change = np.abs(np.diff(joint_velocity, axis=0))
  idle = np.all(change < IDLE_VELOCITY_CHANGE, axis=1)
  return np.concatenate([[False], idle])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """The `[start, end)` runs of True in a bool [T] mask."""
  padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
  edges = np.diff(padded)
  return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def keep_ranges(
  joint_velocity: np.ndarray,
  *,
  min_idle_run: int = MIN_IDLE_RUN,
  min_kept_range: int = MIN_KEPT_RANGE,
  drop_last_frames: int = DROP_LAST_FRAMES,
) -> list[tuple[int, int]]:
  """openpi's idle filter: the `[start, end)` step ranges of an episode worth training on.

  Idle runs of at least `min_idle_run` steps are cut out; what remains is split into ranges, ranges
  shorter than `min_kept_range` are dropped, and the last `drop_last_frames` steps of each survivor
  are dropped (their action chunks run into the idle stretch or the episode end).

  Args:
    joint_velocity: [T, 7] commanded joint velocities.

  Returns:
    Sorted, disjoint `(start, end)` pairs.
  """
  idle = idle_steps(joint_velocity)
  long_idle = np.zeros_like(idle)
  for start, end in _runs(idle):
    if end - start >= min_idle_run:
      long_idle[start:end] = True
  ranges = [(s, e) for s, e in _runs(~long_idle) if e - s >= min_kept_range]
  return [(s, e - drop_last_frames) for s, e in ranges if e - drop_last_frames > s]


def ranges_to_mask(ranges: Sequence[Sequence[int]], length: int) -> np.ndarray:
  """bool [length], True on the steps covered by the `[start, end)` ranges."""
  mask = np.zeros(length, bool)
  for start, end in ranges:
    mask[max(start, 0) : min(end, length)] = True
  return mask


def load_keep_ranges(path: str) -> dict[str, list[tuple[int, int]]]:
  """Loads openpi's published keep-ranges: {"{recording_folderpath}--{file_path}": [[s, e], ...]}.

  Accepts local paths and gs:// (through tf.io.gfile).
  """
  import tensorflow as tf  # Only for gs:// paths; keeps this module importable without TF.

  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"keep-ranges JSON not found: {path}")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"keep-ranges JSON {path} is not valid JSON: {e}") from e
  if not isinstance(raw, Mapping):
    raise ValueError(f"keep-ranges JSON {path} must map episode keys to range lists")
  ranges = {}
  for key, value in raw.items():
    try:
      pairs = [(int(start), int(end)) for start, end in value]
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"keep-ranges JSON {path}: entry {key!r} must be a list of [start, end] pairs, "
        f"got {value!r}"
      ) from e
    if any(end < start for start, end in pairs):
      raise ValueError(f"keep-ranges JSON {path}: entry {key!r} has a range with end < start")
    ranges[key] = pairs
  return ranges


def save_keep_ranges(ranges: Mapping[str, Sequence[Sequence[int]]], path: str) -> None:
  """Writes keep-ranges in openpi's JSON format (the inverse of `load_keep_ranges`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: [[int(s), int(e)] for s, e in v] for k, v in ranges.items()}, f)


def state_vector(joint_position: np.ndarray, gripper_position: np.ndarray) -> np.ndarray:
  """The 8-dim proprioceptive state: `observation/joint_position` (7) + `gripper_position` (1).

  Args:
    joint_position: [..., 7].
    gripper_position: [..., 1].

  Returns:
    float32 [..., 8].
  """
  joint_position = np.asarray(joint_position)
  gripper_position = np.asarray(gripper_position)
  if joint_position.shape[-1:] != (NUM_JOINTS,) or gripper_position.shape[-1:] != (1,):
    raise ValueError(
      f"state needs joint_position [..., {NUM_JOINTS}] and gripper_position [..., 1], got "
      f"{joint_position.shape} and {gripper_position.shape}"
    )
  return np.concatenate([joint_position, gripper_position], axis=-1).astype(np.float32)


def actions_from_action_dict(
  action_dict: Mapping[str, np.ndarray], action_space: str = "joint_position"
) -> np.ndarray:
  """The 8-dim actions of an episode: joint_position (or joint_velocity) (7) + gripper_position (1).

  Args:
    action_dict: the episode's `steps/action_dict`, each entry stacked over time ([T, ...]).
    action_space: "joint_position" (openpi's default) or "joint_velocity" (original pi0.5-DROID).

  Returns:
    float32 [T, 8].
  """
  if action_space not in ACTION_SPACES:
    raise ValueError(f"action_space must be one of {ACTION_SPACES}, got {action_space!r}")
  return state_vector(action_dict[action_space], action_dict["gripper_position"])


def action_chunks(actions: np.ndarray, horizon: int) -> np.ndarray:
  """All action chunks of an episode: chunk t holds actions[t : t + horizon], end-clamped.

  Past the episode's end the last action repeats (it is an absolute target, so holding it is the
  natural continuation).

  Args:
    actions: [T, D].
    horizon: H.

  Returns:
    [T, H, D], same dtype as `actions`.
  """
  actions = np.asarray(actions)
  if actions.ndim != 2 or actions.shape[0] == 0:
    raise ValueError(f"actions must be a non-empty [T, D] array, got shape {actions.shape}")
  if horizon < 1:
    raise ValueError(f"action horizon must be >= 1, got {horizon}")
  length = actions.shape[0]
  index = np.minimum(np.arange(length)[:, None] + np.arange(horizon)[None, :], length - 1)
  return actions[index]


def _delta_mask(mask: Sequence[bool], action_dim: int) -> np.ndarray:
  mask = np.asarray(mask, bool)
  if mask.ndim != 1 or mask.shape[0] > action_dim:
    raise ValueError(f"delta action mask {mask.tolist()} does not fit {action_dim} action dims")
  # Dims beyond the mask (e.g. model padding) stay absolute.
  return np.pad(mask, (0, action_dim - mask.shape[0]))


def to_delta_actions(
  actions: np.ndarray, state: np.ndarray, mask: Sequence[bool] = DEFAULT_DELTA_ACTION_MASK
) -> np.ndarray:
  """Absolute -> delta actions (openpi's DeltaActions): masked dims become actions - state.

  Args:
    actions: [..., H, D] absolute action chunk(s).
    state: [..., S] the state the chunk starts from; S >= number of masked dims.
    mask: which action dims are relative; dims past the mask stay absolute.

  Returns:
    [..., H, D], same dtype as `actions`.
  """
  actions = np.asarray(actions)
  mask = _delta_mask(mask, actions.shape[-1])
  offset = _state_offset(state, mask, actions)
  return (actions - offset).astype(actions.dtype)


def to_absolute_actions(
  actions: np.ndarray, state: np.ndarray, mask: Sequence[bool] = DEFAULT_DELTA_ACTION_MASK
) -> np.ndarray:
  """Delta -> absolute actions (openpi's AbsoluteActions); the inverse of `to_delta_actions`."""
  actions = np.asarray(actions)
  mask = _delta_mask(mask, actions.shape[-1])
  offset = _state_offset(state, mask, actions)
  return (actions + offset).astype(actions.dtype)


def _state_offset(state: np.ndarray, mask: np.ndarray, actions: np.ndarray) -> np.ndarray:
  """[..., 1, D]: the state on masked dims, zero elsewhere, broadcastable against the chunk."""
  state = np.asarray(state)
  num_masked = int(np.flatnonzero(mask).max()) + 1 if mask.any() else 0
  if state.shape[-1] < num_masked:
    raise ValueError(
      f"state has {state.shape[-1]} dims but the delta mask needs {num_masked} (state dims are "
      "matched to action dims by position)"
    )
  if state.shape[:-1] != actions.shape[:-2]:
    raise ValueError(f"state {state.shape} and actions {actions.shape} have different batch dims")
  offset = np.zeros(state.shape[:-1] + (actions.shape[-1],), np.float64)
  width = min(state.shape[-1], actions.shape[-1])
  offset[..., :width] = state[..., :width]
  return (offset * mask)[..., None, :]


# --- From an RLDS episode to prepared frames ------------------------------------------------------

# Counter names, shared by the offline job's manifest and the streaming reader's metrics.
EPISODES_SEEN = "episodes_seen"
EPISODES_KEPT = "episodes_kept"
EPISODES_DROPPED_FAILURE = "episodes_dropped_failure"
EPISODES_DROPPED_NO_INSTRUCTION = "episodes_dropped_no_instruction"
EPISODES_DROPPED_NOT_IN_KEEP_RANGES = "episodes_dropped_not_in_keep_ranges"
EPISODES_DROPPED_BAD = "episodes_dropped_bad"
FRAMES_SEEN = "frames_seen"
FRAMES_KEPT = "frames_kept"
FRAMES_DROPPED_IDLE = "frames_dropped_idle"
FRAMES_DROPPED_NO_INSTRUCTION = "frames_dropped_no_instruction"
FRAMES_DROPPED_BAD = "frames_dropped_bad"
COUNTERS = (
  EPISODES_SEEN, EPISODES_KEPT, EPISODES_DROPPED_FAILURE, EPISODES_DROPPED_NO_INSTRUCTION,
  EPISODES_DROPPED_NOT_IN_KEEP_RANGES, EPISODES_DROPPED_BAD, FRAMES_SEEN, FRAMES_KEPT,
  FRAMES_DROPPED_IDLE, FRAMES_DROPPED_NO_INSTRUCTION, FRAMES_DROPPED_BAD,
)  # fmt: skip


class BadEpisodeError(ValueError):
  """An episode whose arrays do not have DROID's shapes; it is skipped and counted."""


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def stack_steps(steps) -> dict:
  """A sequence of RLDS step dicts -> one dict of arrays stacked over time ([T, ...]).

  Byte strings (JPEG images, instructions) become lists of T items, since they are kept as is.
  """
  steps = [steps[i] for i in range(len(steps))]
  if not steps:
    raise BadEpisodeError("episode has no steps")

  def stack(values):
    first = values[0]
    if isinstance(first, dict):
      return {k: stack([v[k] for v in values]) for k in first}
    if isinstance(first, (bytes, str)):
      return list(values)
    try:
      return np.stack([np.asarray(v) for v in values])
    except ValueError as e:  # Ragged shapes across steps.
      raise BadEpisodeError(f"steps have inconsistent shapes: {e}") from e

  return stack(steps)


def _require(steps: Mapping, path: str, shape: tuple[int, ...], length: int) -> np.ndarray:
  node = steps
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise BadEpisodeError(f"episode lacks steps/{path}")
    node = node[part]
  if isinstance(node, list):
    if len(node) != length:
      raise BadEpisodeError(f"steps/{path} has {len(node)} entries, expected {length}")
    return node
  array = np.asarray(node)
  if array.shape != (length, *shape):
    raise BadEpisodeError(f"steps/{path} has shape {array.shape}, expected {(length, *shape)}")
  return array


def episode_frames(
  metadata: Mapping,
  steps: Mapping,
  counts,
  *,
  action_space: str = "joint_position",
  action_horizon: int = 16,
  keep_ranges_by_episode: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> list[dict]:
  """The prepared-frame records (ki.data.records) of one RLDS episode, after every filter.

  Filters, in order, each counted in `counts` (a collections.Counter, keys in COUNTERS):
  success (file_path), an instruction somewhere in the episode, DROID's shapes (else
  BadEpisodeError is counted as episodes_dropped_bad), then per frame: the keep-ranges (openpi's
  published ones when `keep_ranges_by_episode` is given, else openpi's idle rule), an instruction
  on the frame, finite state and finite action chunk.

  Args:
    metadata: `episode_metadata` with `file_path` and `recording_folderpath` (str or bytes).
    steps: the episode's steps stacked over time (`stack_steps`), images as JPEG bytes.
    counts: a Counter updated in place.
    action_space: "joint_position" or "joint_velocity" (+ gripper_position either way).
    action_horizon: H, the length of each action chunk.
    keep_ranges_by_episode: openpi's keep-ranges JSON, loaded (`load_keep_ranges`).

  Returns:
    A list of frame dicts for `ki.data.records.encode_frame`.
  """
  counts[EPISODES_SEEN] += 1
  file_path = _text(metadata["file_path"])
  episode_id = episode_key(_text(metadata["recording_folderpath"]), file_path)
  if not is_success(file_path):
    counts[EPISODES_DROPPED_FAILURE] += 1
    return []
  try:
    length = len(_require(steps, "is_first", (), len(steps["is_first"])))
    instructions = [[_text(s) for s in _require(steps, k, (), length)] for k in INSTRUCTION_KEYS]
    images = {c: _require(steps, f"observation/{c}", (), length) for c in CAMERA_NAMES}
    state = state_vector(
      _require(steps, "observation/joint_position", (NUM_JOINTS,), length),
      _require(steps, "observation/gripper_position", (1,), length),
    )
    action_dict = {
      key: _require(steps, f"action_dict/{key}", (size,), length)
      for key, size in (("joint_position", 7), ("joint_velocity", 7), ("gripper_position", 1))
    }
  except (BadEpisodeError, KeyError, TypeError) as e:
    counts[EPISODES_DROPPED_BAD] += 1
    raise BadEpisodeError(f"episode {episode_id}: {e}") from e
  has_instruction = [any(texts[t] for texts in instructions) for t in range(length)]
  if not any(has_instruction):
    counts[EPISODES_DROPPED_NO_INSTRUCTION] += 1
    return []
  if keep_ranges_by_episode is not None:
    if episode_id not in keep_ranges_by_episode:
      counts[EPISODES_DROPPED_NOT_IN_KEEP_RANGES] += 1
      return []
    ranges = keep_ranges_by_episode[episode_id]
  else:
    ranges = keep_ranges(action_dict["joint_velocity"])
  keep = ranges_to_mask(ranges, length)
  chunks = action_chunks(actions_from_action_dict(action_dict, action_space), action_horizon)
  finite = np.isfinite(state).all(axis=1) & np.isfinite(chunks).all(axis=(1, 2))
  counts[EPISODES_KEPT] += 1
  counts[FRAMES_SEEN] += length
  counts[FRAMES_DROPPED_IDLE] += int((~keep).sum())
  counts[FRAMES_DROPPED_NO_INSTRUCTION] += int((keep & ~np.array(has_instruction)).sum())
  counts[FRAMES_DROPPED_BAD] += int((keep & np.array(has_instruction) & ~finite).sum())
  frames = []
  for t in np.flatnonzero(keep & np.array(has_instruction) & finite):
    frames.append(
      {
        "episode_id": episode_id,
        "step": int(t),
        "episode_length": length,
        "images": {c: bytes(images[c][t]) for c in CAMERA_NAMES},
        "state": state[t],
        "actions": chunks[t],
        "instructions": [texts[t] for texts in instructions],
      }
    )
  counts[FRAMES_KEPT] += len(frames)
  return frames
