"""Closed-loop evaluation (ki.eval.metaworld): a tiny policy trained a few steps on the test demos
runs episodes in the simulator, locally and through ki.serve with openpi's protocol; the report,
table, chart and videos are written; what cannot work is refused before any episode runs."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from ki.eval import metaworld as evaluation
from ki.serve import client as client_lib
from ki.serve import policy as policy_lib
from ki.serve import server as server_lib
from tests import xla_flags
from tests.serve import conftest as serve_fixtures
from tests.sim.conftest import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.xdist_group("metaworld")  # one worker makes the demos once


@pytest.fixture(scope="module")
def trained(demos, tmp_path_factory, compilation_cache):
  """experiments/metaworld_ki.py:smoke trained for 4 steps on the test demos."""
  root, _ = demos
  workdir = tmp_path_factory.mktemp("metaworld_train") / "work"
  env = xla_flags.subprocess_env(KI_METAWORLD=str(root))
  command = [
    sys.executable,
    "-m",
    "ki.main",
    "--config=experiments/metaworld_ki.py:smoke",
    f"--workdir={workdir}",
    "--config.eval.every=0",
    # Closed-loop success during training, at the last step: one short episode per task.
    "--config.eval.sim.every=4",
    f"--config.eval.sim.suite={','.join(TASKS)}",
    "--config.eval.sim.episodes_per_task=1",
    "--config.eval.sim.max_steps=16",
    "--config.eval.sim.image_size=64",
    f"--config.compilation_cache_dir={compilation_cache}",
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  assert re.search(r"step 4 \| eval/sim/success 0\.\d+ \(2 episodes", output), output[-4000:]
  events = "".join(
    open(os.path.join(folder, name), "rb").read().decode("latin-1")
    for folder, _, names in os.walk(workdir)
    for name in names
    if "tfevents" in name
  )
  assert "eval/sim/success/reach-v3" in events and "eval/sim/success" in events
  return workdir


def _settings(**overrides):
  values = dict(tasks=TASKS, episodes_per_task=1, max_steps=24, image_size=64)
  values.update(overrides)
  return evaluation.Settings(**values)


def _check_report(out, episodes):
  report = json.loads((out / "results.json").read_text())
  assert len(report["episodes"]) == episodes
  for row in report["summary"]["tasks"].values():
    low, high = row["interval95"]
    assert 0.0 <= low <= row["success_rate"] <= high <= 1.0
  assert "| **average** |" in (out / "results.md").read_text()
  assert (out / "success.png").stat().st_size > 0
  videos = os.listdir(out / "videos")
  assert videos and all(name.endswith(".mp4") for name in videos)
  return report


@pytest.mark.slow
def test_a_trained_policy_runs_closed_loop_locally_and_deterministically(trained, tmp_path):
  first = evaluation.evaluate(
    _settings(), str(tmp_path / "a"), checkpoint=str(trained), num_envs=2, progress=False
  )
  report = _check_report(tmp_path / "a", episodes=2)
  assert [e["task"] for e in report["episodes"]] == list(TASKS)
  assert all(e["steps"] == 24 or e["success"] for e in report["episodes"])
  again = evaluation.evaluate(
    _settings(), str(tmp_path / "b"), checkpoint=str(trained), num_envs=2, progress=False
  )
  assert first == again
  episodes = json.loads((tmp_path / "b" / "results.json").read_text())["episodes"]
  assert episodes == report["episodes"]


@pytest.mark.slow
def test_a_trained_policy_runs_through_the_server_with_rtc(trained, tmp_path):
  policy = policy_lib.Policy.from_checkpoint(str(trained))
  server = server_lib.PolicyServer(policy, port=0)
  server.start_in_thread()
  try:
    settings = _settings(delay=2, strategy="rtc")
    summary = evaluation.evaluate(
      settings,
      str(tmp_path / "served"),
      server=f"ws://127.0.0.1:{server.port}",
      num_envs=2,
      progress=False,
    )
  finally:
    server.stop()
  assert summary["episodes"] == 2
  _check_report(tmp_path / "served", episodes=2)


def test_a_policy_for_another_robot_is_refused_before_any_episode(tmp_path):
  """The serve tests' DROID checkpoint (8-D actions and state, two cameras)."""
  serve_fixtures.write_checkpoint(tmp_path, serve_fixtures.tiny_model_config())
  out = tmp_path / "report"
  with pytest.raises(evaluation.IncompatiblePolicyError, match="8-D actions") as error:
    evaluation.evaluate(_settings(), str(out), checkpoint=str(tmp_path), progress=False)
  assert "wrist" in str(error.value) or "DROID" in str(error.value)
  assert not out.exists()


def test_the_state_flag_must_match_the_policy():
  metadata = {
    "action_dim": 4,
    "state_dim": 39,
    "action_horizon": 16,
    "observation_keys": ["observation/image", "observation/state", "prompt"],
  }
  assert evaluation.check_policy(metadata, _settings(state="environment_state")) == 16
  with pytest.raises(evaluation.IncompatiblePolicyError, match="--state=environment_state"):
    evaluation.check_policy(metadata, _settings())
  with pytest.raises(ValueError, match="horizon"):
    evaluation.check_policy(
      metadata, _settings(state="environment_state", execute_steps=16, delay=1)
    )


def test_an_unreachable_server_is_an_error_not_a_hang():
  with socket.socket() as probe:  # a port nobody listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  start = time.monotonic()
  with pytest.raises(client_lib.ServerUnreachableError, match="ki.serve"):
    client_lib.PolicyClient(f"ws://127.0.0.1:{port}", open_timeout_s=2)
  # A listener that accepts the connection and never answers the handshake.
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen()
  accepted = []
  threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
  with pytest.raises(client_lib.ServerUnreachableError):
    client_lib.PolicyClient(f"127.0.0.1:{silent.getsockname()[1]}", open_timeout_s=1)
  silent.close()
  assert time.monotonic() - start < 20


def test_a_bad_sim_eval_config_is_refused_before_training():
  from experiments import metaworld_ki  # pylint: disable=g-import-not-at-top

  config = metaworld_ki.get_config("smoke")
  config.unlock()
  config.eval.sim.every = 4
  assert evaluation.settings_from_config(config).tasks == evaluation.metaworld.MT10
  config.eval.sim.suite = "reach-v9"
  with pytest.raises(ValueError, match="reach-v3"):
    evaluation.settings_from_config(config)
  config.eval.sim.suite = "mt10"
  config.data.robot.state_key = "observation.environment_state"
  assert evaluation.settings_from_config(config).state == "environment_state"
  config.model.data_action_dim = 7
  with pytest.raises(evaluation.IncompatiblePolicyError, match="4-D"):
    evaluation.settings_from_config(config)
