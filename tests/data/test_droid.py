"""DROID episode rules: success filter, openpi's idle rule, keep-ranges JSON, chunks, deltas."""

import json

import numpy as np
import pytest

from ki.data import droid


def _velocities(segments):
  """[T, 7] joint velocities from (kind, length) segments: 'idle' holds the last value exactly,
  'move' changes every joint by 0.01 per step."""
  rows, value = [], 0.0
  for kind, length in segments:
    for _ in range(length):
      if kind == "move":
        value += 0.01
      rows.append(np.full(droid.NUM_JOINTS, value))
  return np.stack(rows)


def test_success_filter_reads_file_path():
  assert droid.is_success("gs://x/r2d2/ILIAD/success/2023-04-21/trajectory.h5")
  assert not droid.is_success("gs://x/r2d2/ILIAD/failure/2023-04-21/trajectory.h5")


def test_idle_steps_need_every_joint_below_threshold():
  velocity = np.zeros((4, 7))
  velocity[1, :] = 5e-4  # Step 1 changes every joint by 5e-4 < 1e-3: idle.
  velocity[2, 3] = 2e-3  # Steps 2 and 3 change joint 3 by >= 1.5e-3: not idle.
  idle = droid.idle_steps(velocity)
  # Step 0 has no previous step and is never idle.
  np.testing.assert_array_equal(idle, [False, True, False, False])


def test_keep_ranges_cut_long_idle_runs_and_drop_last_frames():
  # 10 idle steps at the start: steps 1..9 are idle (step 0 has no previous) -> run of 9 >= 7.
  velocity = _velocities([("idle", 10), ("move", 40)])
  # [0, 1) is too short; [10, 50) minus its last 10 frames.
  assert droid.keep_ranges(velocity) == [(10, 40)]


def test_short_idle_runs_are_kept():
  velocity = _velocities([("move", 20), ("idle", 6), ("move", 20)])
  assert droid.keep_ranges(velocity) == [(0, 36)]


def test_idle_run_of_exactly_seven_is_cut_and_short_ranges_dropped():
  # move 30 | idle 7 | move 15 | idle 8 | move 20
  velocity = _velocities([("move", 30), ("idle", 7), ("move", 15), ("idle", 8), ("move", 20)])
  # Runs: [0, 30) kept; idle [30, 37); [37, 52) has 15 < 16 steps: dropped; idle [52, 60);
  # [60, 80) kept. Each kept range loses its last 10 frames.
  assert droid.keep_ranges(velocity) == [(0, 20), (60, 70)]


def test_range_of_sixteen_survives_with_six_frames():
  velocity = _velocities([("idle", 8), ("move", 16), ("idle", 8)])
  # idle steps 1..7 (run of 7) and the trailing idle run [24, 32); [8, 24) has exactly 16 steps.
  assert droid.keep_ranges(velocity) == [(8, 14)]


def test_ranges_to_mask():
  np.testing.assert_array_equal(droid.ranges_to_mask([(1, 3), (4, 9)], 6), [0, 1, 1, 0, 1, 1])


def test_keep_ranges_json_roundtrip_and_errors(tmp_path):
  key = droid.episode_key("gs://r/recordings/MP4", "gs://r/success/trajectory.h5")
  assert key == "gs://r/recordings/MP4--gs://r/success/trajectory.h5"
  path = str(tmp_path / "ranges.json")
  droid.save_keep_ranges({key: [(0, 12), (20, 40)]}, path)
  assert droid.load_keep_ranges(path) == {key: [(0, 12), (20, 40)]}
  with pytest.raises(FileNotFoundError, match="missing.json"):
    droid.load_keep_ranges(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text(json.dumps({key: [[0, 1, 2]]}))
  with pytest.raises(ValueError, match="start, end"):
    droid.load_keep_ranges(str(tmp_path / "bad.json"))


def test_action_chunks_clamp_at_episode_end():
  actions = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 8), np.float32)
  chunks = droid.action_chunks(actions, 3)
  assert chunks.shape == (5, 3, 8) and chunks.dtype == np.float32
  np.testing.assert_array_equal(
    chunks[:, :, 0], [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4], [4, 4, 4]]
  )
  with pytest.raises(ValueError, match="horizon"):
    droid.action_chunks(actions, 0)


def test_actions_and_state_from_action_dict():
  steps = 4
  action_dict = {
    "joint_position": np.arange(steps * 7, dtype=np.float64).reshape(steps, 7),
    "joint_velocity": -np.ones((steps, 7)),
    "gripper_position": np.full((steps, 1), 0.5),
  }
  position = droid.actions_from_action_dict(action_dict, "joint_position")
  assert position.shape == (steps, 8) and position.dtype == np.float32
  np.testing.assert_array_equal(position[1], [7, 8, 9, 10, 11, 12, 13, 0.5])
  velocity = droid.actions_from_action_dict(action_dict, "joint_velocity")
  np.testing.assert_array_equal(velocity[0], [-1] * 7 + [0.5])
  with pytest.raises(ValueError, match="action_space"):
    droid.actions_from_action_dict(action_dict, "cartesian")
  with pytest.raises(ValueError, match="joint_position"):
    droid.state_vector(np.zeros((2, 6)), np.zeros((2, 1)))


def test_delta_actions_move_joints_only_and_invert():
  rng = np.random.default_rng(0)
  state = rng.normal(size=(2, 8)).astype(np.float32)
  actions = rng.normal(size=(2, 4, 8)).astype(np.float32)
  delta = droid.to_delta_actions(actions, state)
  np.testing.assert_allclose(delta[..., :7], actions[..., :7] - state[:, None, :7], rtol=1e-6)
  np.testing.assert_array_equal(delta[..., 7], actions[..., 7])  # The gripper stays absolute.
  np.testing.assert_allclose(droid.to_absolute_actions(delta, state), actions, atol=1e-6)
  # Padded action dims beyond the mask stay absolute; an unbatched chunk works too.
  padded = np.pad(actions[0], ((0, 0), (0, 24)))
  np.testing.assert_allclose(droid.to_delta_actions(padded, state[0])[:, :8], delta[0], atol=1e-6)
  with pytest.raises(ValueError, match="state has 3 dims"):
    droid.to_delta_actions(actions[0], state[0, :3])
