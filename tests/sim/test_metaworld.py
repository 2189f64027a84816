"""Meta-World through ki: the env wrapper, the expert demonstrations as a LeRobot dataset, and the
errors a user meets first (unknown task, no headless GL)."""

import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from experiments import metaworld_ki
from ki.data import lerobot, robot_spec
from ki.eval import metaworld as evaluation
from ki.sim import metaworld, metaworld_demos
from ki.train import setup as setup_lib
from tests.sim.conftest import EPISODES_PER_TASK, IMAGE_SIZE, TASKS

pytestmark = pytest.mark.xdist_group("metaworld")  # one worker makes the demos once


def _episodes(root):
  """(task, configuration, rows, first decoded frame) of every stored episode, in order."""
  dataset = lerobot.open_dataset(str(root))
  frames = lerobot.LeRobotFrames(
    dataset,
    cameras=(metaworld_demos.IMAGE_KEY,),
    state_key=metaworld_demos.ENVIRONMENT_STATE_KEY,
    action_key=metaworld_demos.ACTION_KEY,
    action_horizon=1,
  )
  by_instruction = {text: task for task, text in metaworld.INSTRUCTIONS.items()}
  result, start = [], 0
  for position, episode in enumerate(dataset.episodes):
    rows = frames.episode_rows(episode)
    task = by_instruction[dataset.tasks[int(rows.task_index[0])]]
    first = frames[start]["images"][metaworld_demos.IMAGE_KEY]
    result.append((task, position % EPISODES_PER_TASK, rows, first))
    start += episode.length
  return dataset, result


def test_demos_are_a_lerobot_dataset_of_successful_expert_episodes(demos):
  root, summary = demos
  dataset, episodes = _episodes(root)
  assert dataset.version == "v3.0" and dataset.fps == metaworld.FPS
  assert dataset.features[metaworld_demos.IMAGE_KEY]["shape"] == [IMAGE_SIZE, IMAGE_SIZE, 3]
  assert dataset.features[metaworld_demos.STATE_KEY]["shape"] == [4]
  assert dataset.features[metaworld_demos.ENVIRONMENT_STATE_KEY]["shape"] == [39]
  assert sorted(dataset.tasks.values()) == sorted(metaworld.INSTRUCTIONS[t] for t in TASKS)
  assert [e[0] for e in episodes] == [t for t in TASKS for _ in range(EPISODES_PER_TASK)]
  for task in TASKS:
    assert summary["tasks"][task]["kept"] == EPISODES_PER_TASK
  for _, _, rows, _ in episodes:
    assert np.all(np.abs(rows.actions) <= 1.0)  # what the simulator executed: clipped
  table = pq.read_table(str(root / "data/chunk-000/file-000.parquet"), columns=["next.success"])
  success = lerobot.column_array(table, "next.success")
  assert success.sum() == len(episodes)  # one success per episode: its last frame
  for name in ("norm_stats_state.json", "norm_stats_environment_state.json", "tokenizer.model"):
    assert (pathlib.Path(metaworld_demos.assets_dir(str(root))) / name).exists()


def _simulator(seed: int = 0):
  """One simulator process (ki.eval.metaworld.Simulators): rendering in a process that also runs
  JAX can crash it, so tests render where the evaluation does, in a worker process."""
  return evaluation.Simulators(1, image_size=IMAGE_SIZE, seed=seed)


def test_stored_episodes_replay_to_success_from_their_first_frame(demos):
  """What is stored is what was executed: replaying the stored actions open loop from the same
  configuration reproduces the stored states and succeeds at the last action; the first stored
  state is fresh (window-close's stale reset observation is 0.2 off); the first stored frame is
  what the camera shows at reset."""
  root, _ = demos
  _, episodes = _episodes(root)
  simulator = _simulator()
  try:
    for task, configuration, rows, first_frame in episodes:
      simulator.send(0, "reset", task, configuration, False)
      observation = simulator.receive(0)
      np.testing.assert_allclose(rows.state[0], observation.environment_state, atol=1e-5)
      # The first frame is not stale: the object moves less than 1 cm in the first step.
      assert np.abs(rows.state[1][4:7] - rows.state[0][4:7]).max() < 0.01, task
      assert np.abs(first_frame.astype(int) - observation.image).mean() < 8  # H.264 is lossy
      success = False
      for t, action in enumerate(rows.actions):
        np.testing.assert_allclose(rows.state[t], observation.environment_state, atol=1e-4)
        assert not success, "succeeded before the stored episode ended"
        simulator.send(0, "act", action[None])
        observation, success, _ = simulator.receive(0)
      assert success, task
  finally:
    simulator.close()


def test_the_camera_image_is_upright_and_each_env_draws_its_own_scene():
  """Raising the hand moves it up in the image: the rows where the red arm appears move up. A
  worker that returns to a task after making another task's Env draws the same first frame
  (each Env renders with its own GL context)."""
  simulator = _simulator()
  try:
    simulator.send(0, "reset", "reach-v3", 0, False)
    before = simulator.receive(0).image
    simulator.send(0, "act", np.tile(np.array([0.0, 0.0, 1.0, 0.0], np.float32), (15, 1)))
    after, _, steps = simulator.receive(0)
    simulator.send(0, "reset", "window-close-v3", 0, False)
    other = simulator.receive(0).image
    simulator.send(0, "reset", "reach-v3", 0, False)
    again = simulator.receive(0).image
  finally:
    simulator.close()
  assert steps == 15
  assert not np.array_equal(other, before)
  np.testing.assert_array_equal(again, before)

  def red(image):
    return (image[..., 0] > 100) & (image[..., 1] < 60) & (image[..., 2] < 60)

  gone, new = red(before) & ~red(after.image), red(after.image) & ~red(before)
  assert gone.sum() > 20 and new.sum() > 20
  assert np.argwhere(new)[:, 0].mean() < np.argwhere(gone)[:, 0].mean() - 3


def test_demos_do_not_depend_on_the_number_of_workers(demos, tmp_path):
  root, _ = demos
  again = tmp_path / "again"
  metaworld_demos.generate(
    str(again),
    tasks=TASKS,
    episodes_per_task=EPISODES_PER_TASK,
    image_size=IMAGE_SIZE,
    workers=2,
    progress=False,
  )
  for relative in (
    "data/chunk-000/file-000.parquet",
    f"videos/{metaworld_demos.IMAGE_KEY}/chunk-000/file-000.mp4",
    "meta/info.json",
  ):
    assert (root / relative).read_bytes() == (again / relative).read_bytes(), relative


@pytest.mark.parametrize("variant", sorted(metaworld_ki.VARIANTS))
def test_every_experiment_variant_fits_the_demos(demos, variant, monkeypatch):
  """Each variant's robot spec and model fit the dataset the demos job writes (the 39-D state
  variant once asked for more state dims than its model's action width)."""
  root, _ = demos
  monkeypatch.setenv("KI_METAWORLD", str(root))
  config = metaworld_ki.get_config(variant)
  robot_spec.validate(
    config.data.robot,
    lerobot.open_dataset(str(root)),
    setup_lib.training_model(config),
    delta_action_mask=config.data.delta_action_mask,
  )


def test_unknown_task_lists_the_valid_ones():
  with pytest.raises(ValueError, match="reach-v3") as error:
    metaworld.resolve_tasks("reach-v9")
  assert "mt10" in str(error.value) and "window-close-v3" in str(error.value)
  assert metaworld.resolve_tasks("mt10") == metaworld.MT10
  assert len(metaworld.resolve_tasks("mt50")) == 50
  assert sum(len(group) for group in metaworld.DIFFICULTY.values()) == 50
  assert {t for group in metaworld.DIFFICULTY.values() for t in group} == set(metaworld.MT50)


@pytest.mark.parametrize(
  "environment, packages",
  [
    ({"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "99"}, "libegl1 libegl-mesa0 libgl1-mesa-dri"),
    ({"MUJOCO_GL": "glfw"}, "libosmesa6"),
  ],
  ids=["egl_fails", "not_headless"],
)
def test_no_headless_rendering_names_the_packages(monkeypatch, environment, packages):
  for key, value in environment.items():
    monkeypatch.setitem(os.environ, key, value)
  with pytest.raises(metaworld.RenderingUnavailableError, match="MUJOCO_GL") as error:
    metaworld.check_rendering()
  assert packages in str(error.value)


def test_wilson_interval():
  assert metaworld.wilson_interval(0, 10)[0] == 0.0
  low, high = metaworld.wilson_interval(5, 10)
  assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
  assert metaworld.wilson_interval(10, 10)[1] == 1.0
