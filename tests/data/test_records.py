"""The prepared-frame record: roundtrip through msgpack, and errors that name the bad field."""

import numpy as np
import pytest

from ki.data import records


def _frame(**overrides):
  frame = {
    "episode_id": "rec/MP4--rec/success/trajectory.h5",
    "step": 3,
    "episode_length": 40,
    "images": {
      "exterior_image_1_left": b"\xff\xd8jpeg-1",
      "exterior_image_2_left": b"\xff\xd8jpeg-2",
      "wrist_image_left": b"\xff\xd8jpeg-3",
    },
    "state": np.linspace(-1, 1, 8, dtype=np.float32),
    "actions": np.arange(16 * 8, dtype=np.float32).reshape(16, 8),
    "instructions": ["pick up the red block", "", "grab the red block"],
  }
  frame.update(overrides)
  return frame


def test_roundtrip_keeps_every_field_exactly():
  frame = _frame()
  decoded = records.decode_frame(records.encode_frame(frame), action_horizon=16)
  assert decoded["episode_id"] == frame["episode_id"]
  assert (decoded["step"], decoded["episode_length"]) == (3, 40)
  assert decoded["images"] == frame["images"]  # Bytes pass through untouched.
  np.testing.assert_array_equal(decoded["state"], frame["state"])
  assert decoded["actions"].dtype == np.float32 and decoded["actions"].shape == (16, 8)
  np.testing.assert_array_equal(decoded["actions"], frame["actions"])
  assert decoded["instructions"] == frame["instructions"]


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"state": np.zeros(7, np.float32)}, "'state' must be float32\\[8\\]"),
    ({"state": np.zeros(8, np.float64)}, "'state' must be float32"),
    ({"actions": np.full((16, 8), np.nan, np.float32)}, "'actions' has non-finite"),
    ({"actions": np.zeros((16, 7), np.float32)}, "'actions' must be float32"),
    ({"step": 40}, "outside the episode"),
    ({"episode_id": ""}, "episode_id"),
    ({"images": {"wrist_image_left": b""}}, "'images' must hold exactly"),
    (
      {"images": dict(_frame()["images"], wrist_image_left=np.zeros(3, np.uint8))},
      "'wrist_image_left' must be encoded bytes",
    ),
    ({"instructions": ["only one"]}, "'instructions' must be a list of 3"),
  ],
)
def test_encode_rejects_bad_fields(overrides, message):
  with pytest.raises(ValueError, match=message):
    records.encode_frame(_frame(**overrides))


def test_decode_rejects_foreign_bytes_and_wrong_horizon():
  with pytest.raises(ValueError, match="not a msgpack frame"):
    records.decode_frame(b"\xc1 not msgpack")
  with pytest.raises(ValueError, match="fields: missing"):
    records.decode_frame(records.msgpack_numpy.packb({"step": 1}))
  with pytest.raises(ValueError, match="horizon 10"):
    records.decode_frame(records.encode_frame(_frame()), action_horizon=10)
