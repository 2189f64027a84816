"""Meta-World (Farama, MuJoCo) as ki sees it: task suites, instructions, one camera, headless.

The facts this module encodes were measured on the 2-core CPU (shared/reference/metaworld.md):
- one camera, LeRobot's view: `corner2` moved to [0.75, 0.075, 0.7] and rotated 180 degrees, which
  is what LeRobot's datasets store. metaworld 3.1.1 has that position built in as `corner4`
  (pixel-identical to the moved corner2), and with mujoco 3.3.0 it renders rotated 180 degrees
  too: `Env` flips it (checked in tests/sim: raising the hand moves it up in the image);
- cheap rendering: shadows off and no off-screen multisampling (~15 ms a 128 px frame instead of
  ~120 ms), images look the same;
- the first observation after `reset()` is stale in seven tasks (window-close's object is 0.2 off):
  `mj_forward` and rebuild it, image included;
- scripted experts act outside [-1, 1]; the env clips, so what was executed is the clipped action;
- episodes truncate at 500 steps and succeed at the first step whose `info["success"]` is set.

Task sampling is the benchmark's own: `metaworld.MT1(task, seed)` draws the task's 50 initial
configurations (`train_tasks`), and episode i of a task uses configuration i % 50. Rendering needs
EGL (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri) or OSMesa (libosmesa6), chosen by MUJOCO_GL
(default egl); `check_rendering` says so when neither works.
"""

import dataclasses
import multiprocessing.util
import os
import subprocess
import sys
from typing import Any

import numpy as np

CAMERA = "corner4"
MAX_EPISODE_STEPS = 500  # the environments' own truncation
FPS = 80  # 0.0025 s x 5 substeps
STATE_DIM, ENVIRONMENT_STATE_DIM, ACTION_DIM = 4, 39, 4

MT10 = (
  "reach-v3",
  "push-v3",
  "pick-place-v3",
  "door-open-v3",
  "drawer-open-v3",
  "drawer-close-v3",
  "button-press-topdown-v3",
  "peg-insert-side-v3",
  "window-open-v3",
  "window-close-v3",
)

# One English sentence per task, in the spirit of LeRobot's Meta-World task descriptions.
INSTRUCTIONS = {
  "assembly-v3": "Pick up the nut and place it onto the peg.",
  "basketball-v3": "Dunk the basketball into the basket.",
  "bin-picking-v3": "Move the puck from one bin into the other bin.",
  "box-close-v3": "Pick up the lid and close the box with it.",
  "button-press-topdown-v3": "Press the button from the top.",
  "button-press-topdown-wall-v3": "Reach over the wall and press the button from the top.",
  "button-press-v3": "Press the button.",
  "button-press-wall-v3": "Get around the wall and press the button.",
  "coffee-button-v3": "Push the button on the coffee machine.",
  "coffee-pull-v3": "Pull the mug away from the coffee machine.",
  "coffee-push-v3": "Push the mug under the coffee machine.",
  "dial-turn-v3": "Turn the dial half a turn.",
  "disassemble-v3": "Pull the nut off the peg.",
  "door-close-v3": "Close the door.",
  "door-lock-v3": "Lock the door by turning the lock clockwise.",
  "door-open-v3": "Open the door.",
  "door-unlock-v3": "Unlock the door by turning the lock counter-clockwise.",
  "drawer-close-v3": "Push the drawer closed.",
  "drawer-open-v3": "Pull the drawer open.",
  "faucet-close-v3": "Turn the faucet clockwise.",
  "faucet-open-v3": "Turn the faucet counter-clockwise.",
  "hammer-v3": "Hammer the nail into the wall.",
  "hand-insert-v3": "Put the gripper into the hole.",
  "handle-press-side-v3": "Press the handle down from the side.",
  "handle-press-v3": "Press the handle down.",
  "handle-pull-side-v3": "Pull the handle up from the side.",
  "handle-pull-v3": "Pull the handle up.",
  "lever-pull-v3": "Pull the lever down a quarter turn.",
  "peg-insert-side-v3": "Insert the peg into the hole from the side.",
  "peg-unplug-side-v3": "Unplug the peg from the side.",
  "pick-out-of-hole-v3": "Pick the puck up out of the hole.",
  "pick-place-v3": "Pick up the puck and place it at the goal.",
  "pick-place-wall-v3": "Pick up the puck, get around the wall and place it at the goal.",
  "plate-slide-back-side-v3": "Slide the plate out of the cabinet from the side.",
  "plate-slide-back-v3": "Slide the plate out of the cabinet.",
  "plate-slide-side-v3": "Slide the plate into the cabinet from the side.",
  "plate-slide-v3": "Slide the plate into the cabinet.",
  "push-back-v3": "Pull the puck back to the goal.",
  "push-v3": "Push the puck to the goal.",
  "push-wall-v3": "Push the puck around the wall to the goal.",
  "reach-v3": "Reach the goal with the gripper.",
  "reach-wall-v3": "Reach over the wall to the goal.",
  "shelf-place-v3": "Pick up the puck and place it on the shelf.",
  "soccer-v3": "Kick the ball into the goal.",
  "stick-pull-v3": "Grasp the stick and pull the box with it.",
  "stick-push-v3": "Grasp the stick and push the box with it.",
  "sweep-into-v3": "Sweep the puck into the hole.",
  "sweep-v3": "Sweep the puck off the table.",
  "window-close-v3": "Push the window closed.",
  "window-open-v3": "Push the window open.",
}
MT50 = tuple(sorted(INSTRUCTIONS))

# LeRobot's MT50 difficulty groups (from Seo et al. 2022), for tables comparable with theirs.
DIFFICULTY = {
  "easy": (
    "button-press-v3",
    "button-press-topdown-v3",
    "button-press-topdown-wall-v3",
    "button-press-wall-v3",
    "coffee-button-v3",
    "dial-turn-v3",
    "door-close-v3",
    "door-lock-v3",
    "door-open-v3",
    "door-unlock-v3",
    "drawer-close-v3",
    "drawer-open-v3",
    "faucet-close-v3",
    "faucet-open-v3",
    "handle-press-v3",
    "handle-press-side-v3",
    "handle-pull-v3",
    "handle-pull-side-v3",
    "lever-pull-v3",
    "plate-slide-v3",
    "plate-slide-back-v3",
    "plate-slide-back-side-v3",
    "plate-slide-side-v3",
    "reach-v3",
    "reach-wall-v3",
    "window-close-v3",
    "window-open-v3",
    "peg-unplug-side-v3",
  ),
  "medium": (
    "basketball-v3",
    "bin-picking-v3",
    "box-close-v3",
    "coffee-pull-v3",
    "coffee-push-v3",
    "hammer-v3",
    "peg-insert-side-v3",
    "push-wall-v3",
    "soccer-v3",
    "sweep-v3",
    "sweep-into-v3",
  ),
  "hard": (
    "assembly-v3",
    "hand-insert-v3",
    "pick-out-of-hole-v3",
    "pick-place-v3",
    "push-v3",
    "push-back-v3",
  ),
  "very_hard": (
    "shelf-place-v3",
    "disassemble-v3",
    "stick-pull-v3",
    "stick-push-v3",
    "pick-place-wall-v3",
  ),
}
SUITES = {"mt10": MT10, "mt50": MT50}
GL_PACKAGES = {
  "egl": "libegl1 libegl-mesa0 libgl1-mesa-dri",
  "osmesa": "libosmesa6",
}


class RenderingUnavailableError(RuntimeError):
  """MuJoCo cannot render headless here; the message names MUJOCO_GL and the Debian packages."""


def resolve_tasks(spec: str) -> tuple[str, ...]:
  """ "mt10", "mt50", or comma-separated task names ("reach-v3,push-v3") -> task names.

  Raises:
    ValueError: for an unknown suite or task, listing the valid ones.
  """
  spec = spec.strip()
  if spec.lower() in SUITES:
    return SUITES[spec.lower()]
  names = tuple(name.strip() for name in spec.split(",") if name.strip())
  unknown = [name for name in names if name not in INSTRUCTIONS]
  if unknown or not names:
    raise ValueError(
      f"Unknown Meta-World task(s) {unknown or [spec]}: give a suite ({', '.join(SUITES)}) or "
      f"task names from: {', '.join(MT50)}"
    )
  return names


def difficulty_of(task: str) -> str:
  for group, tasks in DIFFICULTY.items():
    if task in tasks:
      return group
  raise KeyError(task)


def _gl_backend() -> str:
  # MuJoCo reads MUJOCO_GL when it is first imported; set it before that.
  return os.environ.setdefault("MUJOCO_GL", "egl").lower()


def _make_context(width: int, height: int) -> None:
  import mujoco  # pylint: disable=g-import-not-at-top

  context = mujoco.GLContext(width, height)
  context.make_current()
  context.free()


def check_rendering(width: int = 64, height: int = 64) -> None:
  """Makes one off-screen GL context, or raises RenderingUnavailableError saying what to install.

  Call it before starting work that renders (the demo job and the evaluation do). The context is
  made in a child process: a GL context in a process that also runs JAX can crash it at exit."""
  backend = _gl_backend()
  if backend not in GL_PACKAGES:
    raise RenderingUnavailableError(
      f"MUJOCO_GL={backend!r} cannot render headless; use MUJOCO_GL=egl (Debian packages: "
      f"{GL_PACKAGES['egl']}) or MUJOCO_GL=osmesa ({GL_PACKAGES['osmesa']})."
    )
  code = f"from ki.sim import metaworld; metaworld._make_context({int(width)}, {int(height)})"
  child = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
  )
  if child.returncode != 0:
    lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit code {child.returncode}"
    other = "osmesa" if backend == "egl" else "egl"
    raise RenderingUnavailableError(
      f"MuJoCo cannot render headless with MUJOCO_GL={backend} ({reason}). Install the Debian "
      f"packages {GL_PACKAGES[backend]} (apt-get install {GL_PACKAGES[backend]}), or set "
      f"MUJOCO_GL={other} with {GL_PACKAGES[other]} installed."
    )


@dataclasses.dataclass
class Observation:
  """What one step shows: image uint8 [S, S, 3] (None when not rendering), state float32 [4]
  (hand xyz + gripper opening, LeRobot's `obs[:4]`), environment_state float64 [39] (as the
  simulator gives it: the scripted experts read it at full precision)."""

  image: np.ndarray | None
  state: np.ndarray
  environment_state: np.ndarray


class Env:
  """One Meta-World task with the benchmark's 50 initial configurations of `seed`.

  `reset(configuration)` -> Observation; `step(action [4])` -> (Observation, success). Actions
  are clipped to [-1, 1] before they reach the simulator, as the environment would itself.
  """

  def __init__(self, task: str, *, seed: int = 0, image_size: int | None = 128):
    resolve_tasks(task)
    _gl_backend()
    import metaworld  # pylint: disable=g-import-not-at-top
    import mujoco  # pylint: disable=g-import-not-at-top

    self._mujoco = mujoco
    self.task = task
    self.seed = seed
    self.image_size = image_size
    benchmark = metaworld.MT1(task, seed=seed)
    self.configurations = benchmark.train_tasks
    kwargs = {}
    if image_size:
      kwargs = dict(
        render_mode="rgb_array", camera_name=CAMERA, width=image_size, height=image_size
      )
    self._env = benchmark.train_classes[task](**kwargs)
    self._env.set_task(self.configurations[0])
    model = self._env.model
    model.light_castshadow[:] = 0
    model.vis.quality.offsamples = 0
    self.max_episode_steps = self._env.max_path_length
    self.steps = 0

  @property
  def instruction(self) -> str:
    return INSTRUCTIONS[self.task]

  def _observation(self, raw: np.ndarray) -> Observation:
    image = None
    if self.image_size:
      # Each rendering Env owns a GL context, and gymnasium makes one current only when it
      # creates it: once a second Env exists in the process, drawing this one without making its
      # context current draws with the other's (garbage images).
      renderer = self._env.mujoco_renderer
      renderer._get_viewer("rgb_array").make_context_current()  # pylint: disable=protected-access
      image = np.ascontiguousarray(np.flip(self._env.render(), (0, 1)), dtype=np.uint8)
    return Observation(image, raw[:STATE_DIM].astype(np.float32), np.array(raw, np.float64))

  def reset(self, configuration: int, *, random_vector: np.ndarray | None = None) -> Observation:
    """Starts configuration `configuration % 50` (or the given random vector: the same puck,
    goal or handle placement for two tasks of one model, for language-following pairs)."""
    env = self._env
    env.set_task(self.configurations[configuration % len(self.configurations)])
    if random_vector is not None:
      env._last_rand_vec = np.asarray(random_vector)  # pylint: disable=protected-access
      env._freeze_rand_vec = True  # pylint: disable=protected-access
    env.reset()
    # The observation reset() returns is stale in seven tasks: recompute it from fresh physics.
    self._mujoco.mj_forward(env.model, env.data)
    env._prev_obs = env._get_curr_obs_combined_no_goal()  # pylint: disable=protected-access
    self.steps = 0
    return self._observation(env._get_obs())  # pylint: disable=protected-access

  @property
  def random_vector(self) -> np.ndarray:
    return np.array(self._env._last_rand_vec)  # pylint: disable=protected-access

  def step(self, action: np.ndarray) -> tuple[Observation, bool]:
    action = np.clip(np.asarray(action, np.float64).reshape(ACTION_DIM), -1.0, 1.0)
    raw, _, _, _, info = self._env.step(action)
    self.steps += 1
    return self._observation(raw), bool(info["success"])

  def close(self) -> None:
    self._env.close()


def expert(task: str):
  """The task's scripted expert policy (metaworld.policies): `.get_action(obs [39]) -> [4]`."""
  from metaworld import policies  # pylint: disable=g-import-not-at-top

  return policies.ENV_POLICY_MAP[task]()


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
  """The 95% Wilson score interval of a success rate (sensible at 0 and at n successes)."""
  if trials == 0:
    return 0.0, 1.0
  rate = successes / trials
  denominator = 1 + z * z / trials
  centre = (rate + z * z / (2 * trials)) / denominator
  half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
  return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def describe() -> dict[str, Any]:
  """Versions of what renders and simulates, for reports."""
  import metaworld  # pylint: disable=g-import-not-at-top
  import mujoco  # pylint: disable=g-import-not-at-top

  version = getattr(metaworld, "__version__", None)
  if version is None:
    from importlib import metadata  # pylint: disable=g-import-not-at-top

    version = metadata.version("metaworld")
  return {"metaworld": version, "mujoco": mujoco.__version__, "MUJOCO_GL": _gl_backend()}


# Pool workers (metaworld_demos, metaworld_questions): one Env per (task, seed, image size) in each
# worker process, closed when the worker exits. Never used in a process that runs JAX.
_WORKER_ENVS: dict[tuple, Env] = {}


def worker_env(task: str, seed: int, image_size: int | None) -> Env:
  """This worker process's Env for (task, seed, image_size), made on first use."""
  key = (task, seed, image_size)
  if key not in _WORKER_ENVS:
    _WORKER_ENVS[key] = Env(task, seed=seed, image_size=image_size)
  return _WORKER_ENVS[key]


def _close_worker_envs() -> None:
  for env in _WORKER_ENVS.values():
    env.close()  # EGL complains at exit about renderers left open
  _WORKER_ENVS.clear()


def init_worker() -> None:
  """multiprocessing.Pool initializer for rendering workers."""
  os.environ.setdefault("LP_NUM_THREADS", "1")  # one llvmpipe thread per worker process
  multiprocessing.util.Finalize(None, _close_worker_envs, exitpriority=10)
