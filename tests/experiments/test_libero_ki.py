"""experiments/libero_ki.py: openpi's pi05_libero settings + KI on a LeRobot dataset; the smoke
variant trains end to end on its synthetic LIBERO-spec dataset and serves LIBERO-keyed requests
(the policy tests in tests/serve cover DROID-keyed serving)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import libero_ki
from ki.batch import BASE_SLOT, LEFT_WRIST_SLOT
from ki.data import lerobot, robot_spec
from ki.data import synthetic_lerobot as synthetic
from ki.serve import observation as observation_lib
from ki.serve import policy as policy_lib
from ki.train import setup as setup_lib
from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROGRESS = re.compile(r"step (\d+)/\d+ \| loss [\d.]+ token_ce ([\d.]+) flow_mse ([\d.]+)")


def test_full_variant_follows_openpi_pi05_libero_plus_ki():
  config = libero_ki.get_config("full")
  assert config.batch_size == 256 and config.total_steps == 30_000
  assert config.model.action_horizon == 10 and config.model.action_dim == 32
  assert config.model.data_action_dim == 7 and config.model.image_size == 224
  assert config.model.knowledge_insulation and config.loss.token_weight == 1.0
  assert config.optimizer.ema_decay == 0.999 and config.optimizer.clip_norm == 1.0
  assert config.optimizer.clip == "per_group"  # openpi clips globally; KI's VLM: the token loss's
  for group in config.optimizer.groups.values():
    assert group.peak_lr == 5e-5 and (group.b1, group.b2) == (0.9, 0.95)
  assert config.init.kind == "openpi"
  assert config.data.source == "lerobot" and config.data.delta_action_mask == ()
  assert dict(config.data.robot.cameras) == {"image": BASE_SLOT, "wrist_image": LEFT_WRIST_SLOT}
  assert (config.data.robot.state_key, config.data.robot.action_key) == ("state", "actions")


def test_smoke_spec_fits_the_synthetic_dataset(tmp_path):
  config = libero_ki.get_config("smoke")
  assert config.synthetic_data.dir.endswith("libero_smoke")
  assert config.data.lerobot_dir.startswith(config.synthetic_data.dir)
  synthetic.generate(str(tmp_path / "ds"), version="v3.0", episodes=2, image_size=16)
  dataset = lerobot.open_dataset(str(tmp_path / "ds"))
  model = setup_lib.training_model(config)
  robot_spec.validate(
    config.data.robot, dataset, model, delta_action_mask=config.data.delta_action_mask
  )


@pytest.mark.slow
def test_smoke_trains_and_serves_a_libero_request(tmp_path, compilation_cache):
  env = xla_flags.subprocess_env(KI_CACHE=str(tmp_path / "cache"))
  command = [
    sys.executable,
    "-m",
    "ki.main",
    "--config=experiments/libero_ki.py:smoke",
    f"--workdir={tmp_path / 'work'}",
    # The smoke model with tests/train/tiny.py's widths and 32 px images: the test is about the
    # data, training and serving path, and the smaller program compiles in a fraction of the time.
    "--config.model.vlm_variant=tiny",
    "--config.model.expert_variant=tiny",
    "--config.model.image_size=32",
    "--config.synthetic_data.episodes=10",
    "--config.synthetic_data.vlm_images=20",
    "--config.total_steps=40",
    "--config.log_every=20",
    "--config.checkpoint.every=40",
    "--config.eval.every=0",
    f"--config.compilation_cache_dir={compilation_cache}",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  progress = [(int(s), float(ce), float(mse)) for s, ce, mse in _PROGRESS.findall(output)]
  # The first step is logged too (every counter exists from step 1), then every log_every.
  assert [p[0] for p in progress] == [1, 20, 40]
  (_, first_ce, first_mse), (_, last_ce, last_mse) = progress[0], progress[-1]
  assert last_ce < first_ce and last_mse < first_mse, progress
  assert re.search(r"\[1\] .*data/dropped/corrupt_video=0", output), output[-4000:]
  assert "data/dropped/too_long=0" in output
  # Served from the checkpoint: openpi's LIBERO keys in, 7-D actions out.
  policy = policy_lib.Policy.from_checkpoint(str(tmp_path / "work"))
  assert policy.metadata["observation_keys"] == list(observation_lib.LIBERO_REQUIRED_KEYS)
  assert policy.metadata["action_dim"] == 7
  request = observation_lib.fake_libero_observation(size=256, prompt="pick up the red block")
  actions = policy.infer(request)["actions"]
  assert actions.shape == (10, 7) and np.all(np.isfinite(actions))
  with pytest.raises(observation_lib.InvalidObservationError, match="observation/state"):
    policy.infer(observation_lib.fake_libero_observation(state_dim=5))
  # A DROID-keyed request still parses (its 8-D state has the LIBERO state's width).
  droid_request = observation_lib.fake_droid_observation(prompt="pick up the red block")
  assert policy.infer(droid_request)["actions"].shape == (10, 7)
