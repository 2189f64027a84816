"""Policy: checkpoint loading, the request -> model input path, and actions in raw units."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ki import checkpoint as checkpoint_lib
from ki.batch import Observation
from ki.data import droid, normalize
from ki.serve import observation as observation_lib
from ki.serve import policy as policy_lib
from tests.serve import conftest


def test_infer_returns_absolute_actions_in_raw_units(policy):
  obs = observation_lib.fake_droid_observation()
  obs[observation_lib.JOINT_POSITION] = np.full((7,), 2.0, np.float32)
  result = policy.infer(obs)
  actions = result["actions"]
  assert actions.shape == (4, 8) and actions.dtype == np.float32
  assert np.all(np.isfinite(actions))
  # Joints: deltas of +-0.1 (times the normalised output) around the current joint position 2.0.
  normalised_bound = 20.0
  assert np.all(np.abs(actions[:, :7] - 2.0) < 0.1 * normalised_bound)
  # Gripper: absolute, unnormalised onto [1000, 1001] (+- the same slack).
  assert np.all(np.abs(actions[:, 7] - 1000.5) < 0.5 * normalised_bound)
  assert result["policy_timing"]["infer_ms"] > 0


def test_infer_matches_the_training_transforms_step_by_step(policy):
  """Rebuild the model input as the data pipeline would and undo the outputs by hand."""
  obs = observation_lib.fake_droid_observation(height=120, width=90, prompt="move the cup")
  state = np.concatenate(
    [obs[observation_lib.JOINT_POSITION], obs[observation_lib.GRIPPER_POSITION]]
  ).astype(np.float32)
  count = policy._count  # the next request uses fold_in(seed, count + 1)
  result = policy.infer(obs)

  config = policy.model_config
  normalised_state = normalize.quantile_normalize(state, conftest.STATE_STATS)
  tokens = policy.tokenizer.tokenize_robot("move the cup", normalised_state, None)
  resized = {
    slot: observation_lib.resize_image(obs[key], config.image_size)
    for slot, key in observation_lib.IMAGE_SLOTS.items()
  }
  assert resized["base_0_rgb"].shape == (32, 32, 3)
  # 120x90 is taller than wide: padded left and right with black, like training frames.
  assert resized["base_0_rgb"][:, 0].max() == 0 and resized["base_0_rgb"][:, 16].max() > 0
  observation = Observation(
    images={k: v[None] for k, v in resized.items()},
    image_masks={k: np.ones((1,), bool) for k in resized},
    state=np.pad(normalised_state, (0, config.action_dim - 8))[None],
    has_actions=np.ones((1,), bool),
    **{k: np.asarray(v)[None] for k, v in tokens.items()},
  )
  rng = jax.random.fold_in(jax.random.key(0), count + 1)
  # The policy's compiled function is pi05.sample_actions, nothing else.
  normalised = policy._sample(policy.params, observation, rng)
  expected = normalize.quantile_unnormalize(np.asarray(normalised)[0, :, :8], conftest.ACTION_STATS)
  expected = droid.to_absolute_actions(expected, state, droid.DEFAULT_DELTA_ACTION_MASK)
  np.testing.assert_allclose(result["actions"], expected, rtol=1e-4, atol=1e-4)


def test_requests_get_fresh_noise(policy):
  obs = observation_lib.fake_droid_observation()
  first, second = policy.infer(obs)["actions"], policy.infer(obs)["actions"]
  assert not np.allclose(first, second)


def test_metadata_describes_the_checkpoint(policy, checkpoint_workdir):
  assert policy.metadata["step"] == conftest.STEP
  assert policy.metadata["action_horizon"] == 4 and policy.metadata["action_dim"] == 8
  assert policy.metadata["checkpoint"].endswith(f"checkpoints/{conftest.STEP}")


def test_checkpoint_paths_resolve(checkpoint_workdir):
  """A workdir, its checkpoints/ folder and a step folder name the same checkpoint."""
  step_dir = checkpoint_workdir / "checkpoints" / str(conftest.STEP)
  for path in (checkpoint_workdir, checkpoint_workdir / "checkpoints", step_dir):
    assert checkpoint_lib.resolve_step_dir(path) == step_dir
  with pytest.raises(FileNotFoundError, match="does not exist"):
    policy_lib.Policy.from_checkpoint(str(checkpoint_workdir / "missing"))


def test_serving_does_not_import_the_trainer():
  """Serving reads the checkpoint layout from ki.checkpoint, not from the training code."""
  code = (
    "import sys, ki.serve.policy, ki.serve.server; "
    "print(sorted(m for m in sys.modules if m.startswith('ki.train')))"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
  )
  assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda o: o.pop(observation_lib.WRIST_IMAGE), "lacks"),
    (
      lambda o: o.update({observation_lib.EXTERIOR_IMAGE: np.zeros((8, 8, 3), np.float32)}),
      "dtype uint8",
    ),
    (lambda o: o.update({observation_lib.EXTERIOR_IMAGE: np.zeros((8, 8), np.uint8)}), "shape"),
    (
      lambda o: o.update({observation_lib.JOINT_POSITION: np.zeros((6,), np.float32)}),
      r"shape \(7,\)",
    ),
    (lambda o: o.update({observation_lib.JOINT_POSITION: np.array(["a"] * 7)}), "real numbers"),
    (lambda o: o.update({observation_lib.GRIPPER_POSITION: np.array([np.nan])}), "non-finite"),
    (lambda o: o.update({observation_lib.PROMPT: 3}), "must be a string"),
    (lambda o: o.update({observation_lib.PROMPT: "  "}), "empty"),
    (lambda o: o.update({observation_lib.PROMPT: "pick up the marker " * 40}), "too long"),
  ],
)
def test_bad_observations_name_the_problem(policy, change, message):
  obs = observation_lib.fake_droid_observation()
  change(obs)
  with pytest.raises(observation_lib.InvalidObservationError, match=message):
    policy.infer(obs)


def test_scalar_gripper_and_list_joints_are_accepted(policy):
  obs = observation_lib.fake_droid_observation()
  obs[observation_lib.GRIPPER_POSITION] = 0.5
  obs[observation_lib.JOINT_POSITION] = [0.1] * 7
  assert policy.infer(obs)["actions"].shape == (4, 8)


def test_checkpoint_without_assets_is_refused(checkpoint_workdir, tmp_path):
  step = tmp_path / "checkpoints" / "3"
  (step / "params").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="lacks the assets"):
    policy_lib.Policy.from_checkpoint(str(tmp_path))
