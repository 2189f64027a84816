"""DROID observations from a robot client: checked, then turned into what training fed the model.

A request is openpi's DROID observation dict (the keys openpi's DROID evaluation client sends):
  "observation/exterior_image_1_left": uint8 [H, W, 3], any size (resized with padding here)
  "observation/wrist_image_left":      uint8 [H, W, 3], any size
  "observation/joint_position":        real [7]
  "observation/gripper_position":      real [1] (a scalar is accepted too)
  "prompt":                            str, the language instruction
Extra keys are ignored (openpi's client may send more cameras than the model reads).

A request with "observation/image" is openpi's LIBERO observation instead (its LIBERO client):
  "observation/image":       uint8 [H, W, 3], the agent-view camera (base slot)
  "observation/wrist_image": uint8 [H, W, 3], the wrist camera (left wrist slot)
  "observation/state":       real [S], S = the state dims the policy was trained with (LIBERO: 8)
  "prompt":                  str
`parse_any` picks the format from the keys.

Either format may add real-time chunking (RTC, ki/model/rtc.py) keys; openpi's clients send none
and get plain chunks:
  "rtc/previous_actions": real [K, A], 1 <= K <= H: the chunk the robot is executing, in the raw
                          units the server sent it (absolute joints + gripper for DROID)
  "rtc/executed_steps":   int s, 0 <= s <= K: how many of its actions had been executed when this
                          observation was taken (default 0); without rtc/previous_actions the
                          server uses the chunk it last sent on this connection
  "rtc/inference_delay":  int d, 0 <= d <= K - s: how many more actions of it will execute before
                          the reply arrives (default 0)
`parse_rtc` checks them and returns the previous chunk's remaining actions and d.

Every check raises `InvalidObservationError` naming the key and what is wrong with it, so a robot
operator reading the error on the client side knows what to fix.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ki import batch as batch_lib
from ki.data import droid
from ki.data import images as image_lib

EXTERIOR_IMAGE = "observation/exterior_image_1_left"
WRIST_IMAGE = "observation/wrist_image_left"
JOINT_POSITION = "observation/joint_position"
GRIPPER_POSITION = "observation/gripper_position"
PROMPT = "prompt"
REQUIRED_KEYS = (EXTERIOR_IMAGE, WRIST_IMAGE, JOINT_POSITION, GRIPPER_POSITION, PROMPT)

# Which model camera slot (ki.batch.CAMERA_SLOTS) each client camera fills, as the data
# transforms fill them from a DROID frame.
IMAGE_SLOTS = {batch_lib.BASE_SLOT: EXTERIOR_IMAGE, batch_lib.LEFT_WRIST_SLOT: WRIST_IMAGE}
LIBERO_IMAGE = "observation/image"
LIBERO_WRIST_IMAGE = "observation/wrist_image"
LIBERO_STATE = "observation/state"
LIBERO_REQUIRED_KEYS = (LIBERO_IMAGE, LIBERO_WRIST_IMAGE, LIBERO_STATE, PROMPT)
LIBERO_IMAGE_SLOTS = {
  batch_lib.BASE_SLOT: LIBERO_IMAGE,
  batch_lib.LEFT_WRIST_SLOT: LIBERO_WRIST_IMAGE,
}
RTC_PREVIOUS_ACTIONS = "rtc/previous_actions"
RTC_EXECUTED_STEPS = "rtc/executed_steps"
RTC_INFERENCE_DELAY = "rtc/inference_delay"
RTC_KEYS = (RTC_PREVIOUS_ACTIONS, RTC_EXECUTED_STEPS, RTC_INFERENCE_DELAY)
# Far above any robot camera; refuses a malformed header before PIL allocates for it.
MAX_IMAGE_SIDE = 8192


class InvalidObservationError(ValueError):
  """The request cannot be turned into a model input; the message says which key and why."""


def _image(obs: Mapping[str, Any], key: str) -> np.ndarray:
  image = obs[key]
  if not isinstance(image, np.ndarray):
    raise InvalidObservationError(
      f"{key} must be a uint8 numpy array [H, W, 3], got {type(image).__name__}"
    )
  # Float images would be silently misread (openpi's clients convert to uint8 before sending).
  if image.dtype != np.uint8:
    raise InvalidObservationError(f"{key} must have dtype uint8, got {image.dtype}")
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise InvalidObservationError(
      f"{key} must have shape [H, W, 3] with H, W >= 1, got {image.shape}"
    )
  if max(image.shape[:2]) > MAX_IMAGE_SIDE:
    raise InvalidObservationError(
      f"{key} is {image.shape[0]}x{image.shape[1]}; the largest side accepted is {MAX_IMAGE_SIDE}"
    )
  return image


def _real_vector(obs: Mapping[str, Any], key: str, size: int, *, allow_scalar: bool) -> np.ndarray:
  value = obs[key]
  if isinstance(value, (list, tuple, float, int)) and not isinstance(value, bool):
    value = np.asarray(value)
  if not isinstance(value, (np.ndarray, np.generic)):
    raise InvalidObservationError(
      f"{key} must be a numeric array [{size}], got {type(value).__name__}"
    )
  value = np.asarray(value)
  if value.dtype.kind not in "fiu":
    raise InvalidObservationError(f"{key} must hold real numbers, got dtype {value.dtype}")
  if allow_scalar and value.shape == ():
    value = value.reshape(1)
  if value.shape != (size,):
    raise InvalidObservationError(f"{key} must have shape ({size},), got {value.shape}")
  if not np.all(np.isfinite(value)):
    raise InvalidObservationError(f"{key} has non-finite values: {value.tolist()}")
  return value.astype(np.float32)


def parse(obs: Any) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
  """A checked request -> (raw images by model slot, raw state float32 [8], prompt)."""
  if not isinstance(obs, Mapping):
    raise InvalidObservationError(f"the observation must be a dict, got {type(obs).__name__}")
  missing = [key for key in REQUIRED_KEYS if key not in obs]
  if missing:
    raise InvalidObservationError(f"the observation lacks {missing} (it has {sorted(obs)})")
  images = {slot: _image(obs, key) for slot, key in IMAGE_SLOTS.items()}
  state = droid.state_vector(
    _real_vector(obs, JOINT_POSITION, droid.NUM_JOINTS, allow_scalar=False),
    _real_vector(obs, GRIPPER_POSITION, 1, allow_scalar=True),
  )
  prompt = obs[PROMPT]
  if not isinstance(prompt, str):
    raise InvalidObservationError(f"{PROMPT} must be a string, got {type(prompt).__name__}")
  if not prompt.strip():
    raise InvalidObservationError(f"{PROMPT} is empty: the policy needs an instruction")
  return images, state, prompt


def _prompt(obs: Mapping[str, Any]) -> str:
  prompt = obs[PROMPT]
  if not isinstance(prompt, str):
    raise InvalidObservationError(f"{PROMPT} must be a string, got {type(prompt).__name__}")
  if not prompt.strip():
    raise InvalidObservationError(f"{PROMPT} is empty: the policy needs an instruction")
  return prompt


def libero_required_keys(slots=tuple(LIBERO_IMAGE_SLOTS)) -> tuple[str, ...]:
  """The LIBERO-format keys a policy reading camera `slots` needs (a one-camera policy, e.g.
  Meta-World's, needs no wrist image)."""
  cameras = tuple(key for slot, key in LIBERO_IMAGE_SLOTS.items() if slot in slots)
  return (*cameras, LIBERO_STATE, PROMPT)


def parse_libero(
  obs: Any, state_dim: int, slots=tuple(LIBERO_IMAGE_SLOTS)
) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
  """A checked LIBERO request -> (raw images by slot, raw state float32 [state_dim], prompt).
  Only the cameras of `slots` (the slots the model reads) are required and read."""
  if not isinstance(obs, Mapping):
    raise InvalidObservationError(f"the observation must be a dict, got {type(obs).__name__}")
  missing = [key for key in libero_required_keys(slots) if key not in obs]
  if missing:
    raise InvalidObservationError(f"the observation lacks {missing} (it has {sorted(obs)})")
  images = {
    slot: _image(obs, key) for slot, key in LIBERO_IMAGE_SLOTS.items() if slot in tuple(slots)
  }
  state = _real_vector(obs, LIBERO_STATE, state_dim, allow_scalar=False)
  return images, state, _prompt(obs)


def parse_any(
  obs: Any, *, state_dim: int, slots=tuple(LIBERO_IMAGE_SLOTS)
) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
  """A LIBERO request (it has observation/image) or else a DROID one, checked and parsed."""
  if isinstance(obs, Mapping) and LIBERO_IMAGE in obs:
    return parse_libero(obs, state_dim, slots)
  return parse(obs)


def _count(obs: Mapping[str, Any], key: str, low: int, high: int) -> int:
  """A non-negative step count in [low, high]; integers only (a float delay is a client bug)."""
  if key not in obs:
    return 0
  value = obs[key]
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value[()]
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise InvalidObservationError(f"{key} must be an integer, got {value!r}")
  if not low <= value <= high:
    raise InvalidObservationError(f"{key} must be in [{low}, {high}], got {value}")
  return int(value)


def parse_rtc(
  obs: Mapping[str, Any], *, horizon: int, action_dim: int
) -> tuple[np.ndarray, int] | None:
  """The RTC keys of a checked request -> (remaining float32 [P, action_dim], delay d), or None
  when the request has none (a plain request).

  remaining = rtc/previous_actions[s:]: the previous chunk's actions for this observation's time
  step onward (P = K - s, possibly 0), which the new chunk's first P positions should continue;
  the first d of them execute while the new chunk is computed.
  """
  if not any(key in obs for key in RTC_KEYS):
    return None
  if RTC_PREVIOUS_ACTIONS not in obs:
    raise InvalidObservationError(
      f"{RTC_INFERENCE_DELAY} / {RTC_EXECUTED_STEPS} need a previous chunk: send "
      f"{RTC_PREVIOUS_ACTIONS} (or {RTC_EXECUTED_STEPS} after a reply on the same connection)"
    )
  previous = obs[RTC_PREVIOUS_ACTIONS]
  if not isinstance(previous, np.ndarray) or previous.dtype.kind not in "fiu":
    raise InvalidObservationError(
      f"{RTC_PREVIOUS_ACTIONS} must be a real numpy array [K, {action_dim}] (the chunk the "
      f"server sent), got {getattr(previous, 'dtype', type(previous).__name__)}"
    )
  if previous.ndim != 2 or previous.shape[1] != action_dim or not 1 <= len(previous) <= horizon:
    raise InvalidObservationError(
      f"{RTC_PREVIOUS_ACTIONS} must have shape [K, {action_dim}] with 1 <= K <= {horizon} (the "
      f"horizon), got {previous.shape}"
    )
  if not np.all(np.isfinite(previous)):
    raise InvalidObservationError(f"{RTC_PREVIOUS_ACTIONS} has non-finite values")
  executed = _count(obs, RTC_EXECUTED_STEPS, 0, len(previous))
  remaining = previous[executed:].astype(np.float32)
  delay = _count(obs, RTC_INFERENCE_DELAY, 0, len(remaining))
  return remaining, delay


def fake_libero_observation(
  *, size: int = 256, state_dim: int = 8, prompt: str = "pick up the red block"
) -> dict[str, Any]:
  """A well-formed LIBERO request (256x256 cameras, as LIBERO renders them)."""
  image = fake_droid_observation(height=size, width=size)[EXTERIOR_IMAGE]
  return {
    LIBERO_IMAGE: image,
    LIBERO_WRIST_IMAGE: image[::-1].copy(),
    LIBERO_STATE: np.linspace(-0.5, 0.5, state_dim).astype(np.float32),
    PROMPT: prompt,
  }


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3] with the data pipeline's resize_with_pad (no
  augmentation), so the model sees frames exactly as it saw them in training."""
  resized = image_lib.resize_with_pad(Image.fromarray(image), size, size)
  return np.asarray(resized, dtype=np.uint8)


def fake_droid_observation(
  *, height: int = 180, width: int = 320, prompt: str = "put the marker in the cup"
) -> dict[str, Any]:
  """A well-formed request at DROID's camera resolution (180x320), for warm-up and benchmarks."""
  rows = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
  cols = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
  image = ((rows + cols + np.array([0.0, 85.0, 170.0])) % 256).astype(np.uint8)
  return {
    EXTERIOR_IMAGE: image,
    WRIST_IMAGE: image[::-1].copy(),
    JOINT_POSITION: np.array([0.0, -0.5, 0.0, -2.0, 0.0, 1.6, 0.8], np.float32),
    GRIPPER_POSITION: np.array([0.2], np.float32),
    PROMPT: prompt,
  }
