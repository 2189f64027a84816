"""Questions about Meta-World scenes whose one-word answers need the image (issue 22, stage 1).

A VLM pretrained on these, and compared with its blind twin (grey images), shows whether the
image path learns what a Meta-World policy must see. Every answer is read from the simulator's
state or from what the rendered image shows, never guessed from the question:

  object          Which object is on the table?              puck door drawer button peg window
  open_or_closed  Is the {drawer|window|door} open or closed?      open closed
  gripper         Is the gripper open or closed?                    open closed
  left_or_right   Is the {puck|peg|button} left or right of the gripper?   left right
  marker_colour   What colour is the goal marker?  (puck scenes)    red green blue

A scene is an MT10 task's start (`ki.sim.metaworld.Env`, a random one of its benchmark's 50
configurations) changed at random: the articulated joint set open or closed (by a coin), the
hand moved to a random point by stepping the simulator (1 cm a step, as a policy would move it)
with the gripper open or closed (a coin), then rendered once by the demos' camera. Labels come
from the state after the move (the hand may have pushed the drawer: what is stored is what is
seen); a question whose state is in between (a half-open drawer, a gripper closed on a puck) is
not asked. Balance: scenes are drawn uniformly over the six objects, the open/closed and gripper
coins are fair, for left/right the side is drawn first and the hand target is drawn until it
lands on that side, and a move that ends otherwise (a drawer pushed shut) is redone with a new
target, so a blind model is near chance for every (type, prompt).

Left and right are the image's: the object's and the gripper's columns are the centroids of the
pixels that change when each is hidden (also how visibility is checked: an object or marker
covered by the arm is not asked about). `project` (the camera's pinhole model, flipped as Env
flips) is used only to aim the hand; tests check it against those pixels.

Rendering makes a GL context, which in a process that runs JAX can crash it: `write_vlm_set`
renders in spawned worker processes only, and tests do the same.
"""

import collections
import dataclasses
import io
import json
import multiprocessing
import multiprocessing.util
import os
from typing import Any

import numpy as np
from PIL import Image
import tqdm

from ki.sim import metaworld

HELDOUT_FRACTION = 0.1
JPEG_QUALITY = 90

# The object each MT10 task's scene shows, and the tasks that start from it.
SCENES = {
  "puck": ("reach-v3", "push-v3", "pick-place-v3"),
  "door": ("door-open-v3",),
  "drawer": ("drawer-open-v3", "drawer-close-v3"),
  "button": ("button-press-topdown-v3",),
  "peg": ("peg-insert-side-v3",),
  "window": ("window-open-v3", "window-close-v3"),
}
COLOURS = ("red", "green", "blue")  # a goal marker's rgba has one lit channel (0.8)

QUESTION_TYPES: dict[str, tuple[str, ...]] = {
  "object": tuple(SCENES),
  "open_or_closed": ("open", "closed"),
  "gripper": ("open", "closed"),
  "left_or_right": ("left", "right"),
  "marker_colour": COLOURS,
}
PROMPTS = {
  "object": "Which object is on the table?",
  "open_or_closed": "Is the {name} open or closed?",
  "gripper": "Is the gripper open or closed?",
  "left_or_right": "Is the {name} left or right of the gripper?",
  "marker_colour": "What colour is the goal marker?",
}


@dataclasses.dataclass(frozen=True)
class Joint:
  """An articulated object's joint: |q| <= closed_below reads closed, >= open_above open (in
  between is not asked); open scenes are drawn in [open_above + margin, open_max]."""

  name: str
  sign: float  # the direction that opens it
  closed_below: float
  open_above: float
  open_max: float


JOINTS = {
  "drawer": Joint("goal_slidey", -1.0, 0.02, 0.06, 0.16),  # metres (range [-0.16, 0])
  "window": Joint("window_slide", 1.0, 0.03, 0.1, 0.2),  # metres (range [0, 0.2])
  "door": Joint("doorjoint", -1.0, 0.1, 0.5, 1.6),  # radians (range [-2, 0])
}
# Bodies hidden to find an object's pixels (left/right questions), and the gripper's.
OBJECT_BODIES = {"puck": ("obj",), "peg": ("peg",), "button": ("button",)}
GRIPPER_BODIES = ("hand", "rightclaw", "rightpad", "leftclaw", "leftpad")

# Where the hand is sent: inside the mocap's range, in view of the camera.
HAND_LOW, HAND_HIGH = np.array([-0.3, 0.4, 0.1]), np.array([0.3, 0.95, 0.3])
TCP_BELOW_HAND = 0.045  # the point between the fingers, below obs[:3]
MOVE_STEPS, MIN_MOVE_STEPS = 60, 15  # the gripper needs ~10 steps to close
MAX_ATTEMPTS = 5  # hand moves per scene until it shows what was drawn (see sample_scene)
GRIPPER_OPEN_ABOVE, GRIPPER_CLOSED_BELOW = 0.8, 0.5  # obs[3]: 1.0 open, ~0.3 closed on nothing
# At 128 px the goal marker covers ~17 pixels and the puck ~18: fewer than 6 visible is hidden.
MIN_VISIBLE_PIXELS_AT_128 = 6
SIDE_MARGIN = 0.06  # |object column - gripper column| >= 6% of the width for left/right
PIXEL_CHANGE = 30  # summed |RGB difference| that counts a pixel as changed by hiding something


@dataclasses.dataclass
class Scene:
  """One rendered scene: image uint8 [S, S, 3], its (type, prompt, answer) questions, and the
  facts they were read from (for tests and reports)."""

  index: int
  task: str
  configuration: int
  image: np.ndarray
  questions: list[tuple[str, str, str]]
  facts: dict[str, Any]


def corpus_texts() -> list[str]:
  """Every prompt and answer the questions can produce, in a fixed order (tokenizer corpus)."""
  texts = []
  for kind, template in PROMPTS.items():
    names = {"open_or_closed": JOINTS, "left_or_right": OBJECT_BODIES}.get(kind, {"": None})
    texts += [template.format(name=name) for name in names]
    texts += QUESTION_TYPES[kind]
  return list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------- simulator side
# What follows runs in worker processes that never import JAX (`scenes` starts them).


def _render(env: metaworld.Env) -> np.ndarray:
  """The current state through Env's camera and flip, uint8 [S, S, 3]."""
  return env._observation(env._env._get_obs()).image  # pylint: disable=protected-access


def _changed_pixels(env: metaworld.Env, image: np.ndarray, *, bodies=(), sites=()) -> np.ndarray:
  """bool [S, S]: the pixels of `image` that change when the bodies' geoms and the sites are
  made transparent (what of them is visible, occlusion included)."""
  model = env._env.model  # pylint: disable=protected-access
  body_ids = [model.body(name).id for name in bodies]
  geoms = np.flatnonzero(np.isin(model.geom_bodyid, body_ids))
  site_ids = [model.site(name).id for name in sites]
  geom_alpha, site_alpha = model.geom_rgba[geoms, 3].copy(), model.site_rgba[site_ids, 3].copy()
  model.geom_rgba[geoms, 3] = 0.0
  model.site_rgba[site_ids, 3] = 0.0
  try:
    hidden = _render(env)
  finally:
    model.geom_rgba[geoms, 3] = geom_alpha
    model.site_rgba[site_ids, 3] = site_alpha
  return np.abs(image.astype(np.int32) - hidden).sum(-1) > PIXEL_CHANGE


def project(env: metaworld.Env, points: np.ndarray) -> np.ndarray:
  """World points [N, 3] -> (row, column) [N, 2] in Env's images (pinhole camera, then Env's
  180-degree flip). Aims the hand only; answers come from pixels."""
  model, data = env._env.model, env._env.data  # pylint: disable=protected-access
  camera = model.camera(metaworld.CAMERA).id
  size = env.image_size
  rotation = data.cam_xmat[camera].reshape(3, 3)  # columns: camera x (right), y (up), z (back)
  local = (np.asarray(points, np.float64) - data.cam_xpos[camera]) @ rotation
  focal = 0.5 * size / np.tan(np.deg2rad(model.cam_fovy[camera]) / 2)
  depth = -local[:, 2]
  column = size / 2 + focal * local[:, 0] / depth
  row = size / 2 - focal * local[:, 1] / depth
  return np.stack([size - row, size - column], axis=-1)  # Env flips both axes


def _hand_target(rng, env, scene: str, want_right: bool) -> np.ndarray:
  """A random hand position; for left/right scenes one whose fingers land on the wanted side of
  the object in the image (by projection; up to 50 draws, else the last)."""
  target = rng.uniform(HAND_LOW, HAND_HIGH)
  if scene not in OBJECT_BODIES:
    return target
  data = env._env.data  # pylint: disable=protected-access
  anchor = data.body(OBJECT_BODIES[scene][0]).xpos
  for _ in range(50):
    tcp = target - np.array([0.0, 0.0, TCP_BELOW_HAND])
    columns = project(env, np.stack([anchor, tcp]))[:, 1]
    offset = (columns[0] - columns[1]) / env.image_size  # > 0: object right of the gripper
    if (offset if want_right else -offset) > 2 * SIDE_MARGIN:  # twice the margin: moves err
      break
    target = rng.uniform(HAND_LOW, HAND_HIGH)
  return target


def _move_hand(env: metaworld.Env, target: np.ndarray, close: bool) -> np.ndarray:
  """Steps the simulator (unrendered) towards `target` with the gripper command held; returns
  the last raw observation [39]."""
  raw = env._env  # pylint: disable=protected-access
  observation = raw._get_obs()  # pylint: disable=protected-access
  for step in range(MOVE_STEPS):
    delta = target - observation[:3]
    if step >= MIN_MOVE_STEPS and np.abs(delta).max() < 0.005:
      break
    # Stepping the wrapped env directly: Env.step would render every step (~15 ms each).
    action = np.concatenate(
      [np.clip(delta / raw.action_scale, -1.0, 1.0), [1.0 if close else -1.0]]
    )
    observation = raw.step(action)[0]
  return observation


def _joint_state(env: metaworld.Env, joint: Joint) -> str | None:
  """ "open", "closed", or None in between, from the joint's current position."""
  magnitude = abs(float(env._env.data.joint(joint.name).qpos[0]))  # pylint: disable=protected-access
  if magnitude <= joint.closed_below:
    return "closed"
  return "open" if magnitude >= joint.open_above else None


def _as_asked(env: metaworld.Env, scene: str, want_open: bool, want_right: bool) -> bool:
  """Whether the moved scene still shows what was drawn: the joint open or closed as set, the
  object on the wanted side of the gripper (by projection, with the margin)."""
  raw = env._env  # pylint: disable=protected-access
  if scene in JOINTS:
    return _joint_state(env, JOINTS[scene]) == ("open" if want_open else "closed")
  if scene in OBJECT_BODIES:
    anchor = raw.data.body(OBJECT_BODIES[scene][0]).xpos
    columns = project(env, np.stack([anchor, raw.tcp_center]))[:, 1]
    offset = (columns[0] - columns[1]) / env.image_size
    return (offset if want_right else -offset) >= SIDE_MARGIN
  return True


def _centroid_column(mask: np.ndarray) -> float:
  return float(np.argwhere(mask)[:, 1].mean() + 0.5)


def sample_scene(seed: int, index: int, image_size: int = 128, tasks=metaworld.MT10) -> Scene:
  """Scene `index` of `seed` (depends on nothing else: not on the process nor what it did before).

  Call it in a process that never imports JAX (see the module docstring)."""
  import mujoco  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([seed, index])
  scenes = [name for name, names in SCENES.items() if set(names) & set(tasks)]
  scene = scenes[int(rng.integers(len(scenes)))]
  candidates = [task for task in SCENES[scene] if task in tasks]
  task = candidates[int(rng.integers(len(candidates)))]
  configuration = int(rng.integers(50))
  want_open, close_gripper, want_right = (bool(rng.random() < 0.5) for _ in range(3))
  joint = JOINTS.get(scene)
  magnitude = 0.0
  if joint is not None:
    low, high = 0.0, 0.5 * joint.closed_below
    if want_open:
      low, high = joint.open_above + 0.3 * (joint.open_max - joint.open_above), joint.open_max
    magnitude = rng.uniform(low, high)
  env = metaworld.worker_env(task, seed, image_size)
  raw = env._env  # pylint: disable=protected-access
  # The hand may push a drawer shut or end on the other side of the object: try again (new hand
  # target, same everything else) until the state says what the coins asked for, so answers stay
  # balanced; simulation without rendering is cheap.
  for _ in range(MAX_ATTEMPTS):
    # Solver warm starts and other leftovers of the previous scene would make this one depend on
    # what the process did before (and so on the number of workers).
    mujoco.mj_resetData(raw.model, raw.data)
    env.image_size = None  # reset's own frame is not wanted (one render is ~25% of a scene)
    try:
      env.reset(configuration)
    finally:
      env.image_size = image_size
    if joint is not None:
      raw.data.joint(joint.name).qpos = joint.sign * magnitude
      mujoco.mj_forward(raw.model, raw.data)
    target = _hand_target(rng, env, scene, want_right)
    observation = _move_hand(env, target, close_gripper)
    if _as_asked(env, scene, want_open, want_right):
      break
  image = _render(env)

  min_pixels = max(2, round(MIN_VISIBLE_PIXELS_AT_128 * (image_size / 128) ** 2))
  gripper = _changed_pixels(env, image, bodies=GRIPPER_BODIES)
  facts: dict[str, Any] = {
    "scene": scene,
    "hand": observation[:3].tolist(),
    "gripper_opening": float(observation[3]),
    "gripper_pixels": int(gripper.sum()),
  }
  questions = [("object", PROMPTS["object"], scene)]
  if joint is not None:
    facts["joint"] = abs(float(raw.data.joint(joint.name).qpos[0]))
    state = _joint_state(env, joint)
    if state:
      questions.append(("open_or_closed", PROMPTS["open_or_closed"].format(name=scene), state))
  if gripper.sum() >= min_pixels:
    opening = facts["gripper_opening"]
    state = "open" if opening > GRIPPER_OPEN_ABOVE else None
    state = "closed" if opening < GRIPPER_CLOSED_BELOW else state
    if state:
      questions.append(("gripper", PROMPTS["gripper"], state))
  if scene in OBJECT_BODIES:
    thing = _changed_pixels(env, image, bodies=OBJECT_BODIES[scene])
    facts["object_pixels"] = int(thing.sum())
    if thing.sum() >= min_pixels and gripper.sum() >= min_pixels:
      facts["object_column"] = _centroid_column(thing)
      facts["gripper_column"] = _centroid_column(gripper)
      anchor = raw.data.body(OBJECT_BODIES[scene][0]).xpos
      projected = project(env, np.stack([anchor, raw.tcp_center]))[:, 1]
      facts["object_projected_column"], facts["gripper_projected_column"] = projected.tolist()
      offset = (facts["object_column"] - facts["gripper_column"]) / image_size
      if abs(offset) >= SIDE_MARGIN:
        side = "right" if offset > 0 else "left"
        questions.append(("left_or_right", PROMPTS["left_or_right"].format(name=scene), side))
  if scene == "puck":
    marker = _changed_pixels(env, image, sites=("goal",))
    facts["marker_pixels"] = int(marker.sum())
    if marker.sum() >= min_pixels:
      facts["marker_rgb"] = image[marker].mean(0).round(1).tolist()  # what the image shows there
      rgba = raw.model.site("goal").rgba
      questions.append(
        ("marker_colour", PROMPTS["marker_colour"], COLOURS[int(np.argmax(rgba[:3]))])
      )
  return Scene(index, task, configuration, image, questions, facts)


# ----------------------------------------------------------------------------- the data set


def _jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue()


def _scene_job(job: tuple) -> Scene:
  return sample_scene(*job)


def scenes(
  seed: int,
  num_scenes: int,
  *,
  image_size: int = 128,
  tasks: tuple[str, ...] = metaworld.MT10,
  workers: int = 1,
  progress: bool = False,
):
  """Scenes 0 .. num_scenes - 1 of `seed` in order, rendered in `workers` spawned processes (never
  in this one, which may run JAX)."""
  unknown = sorted(set(tasks) - {task for names in SCENES.values() for task in names})
  if unknown or not tasks:
    raise ValueError(f"Scene questions cover the MT10 tasks only, not {unknown or tasks}")
  metaworld.check_rendering(image_size, image_size)
  jobs = [(seed, index, image_size, tuple(tasks)) for index in range(num_scenes)]
  context = multiprocessing.get_context("spawn")
  with (
    context.Pool(max(1, workers), initializer=metaworld.init_worker) as pool,
    tqdm.tqdm(total=num_scenes, disable=not progress, unit="scene") as bar,
  ):
    for scene in pool.imap(_scene_job, jobs, chunksize=4):
      yield scene
      bar.update(1)
    pool.close()
    pool.join()


def write_vlm_set(
  out_dir: str,
  *,
  num_scenes: int,
  seed: int,
  image_size: int = 128,
  workers: int = 1,
  heldout_fraction: float = HELDOUT_FRACTION,
  tasks: tuple[str, ...] = metaworld.MT10,
  progress: bool = True,
) -> dict[str, Any]:
  """`images/NNNNN.jpg`, `train.jsonl`, `heldout.jsonl` under `out_dir`, lines {"image",
  "prompt", "answer", "type"} as ki.data.synthetic_droid.write_vlm_set writes them; the last
  `heldout_fraction` of the scenes are held out (their images are never in train). Also
  `scenes.jsonl`: each scene's task, configuration, split and the facts its answers were read
  from (for analysis). The same arguments give the same bytes whatever `workers` is. Returns
  `summarize`'s counts, plus lines per split and type, scenes per split and task."""
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  num_heldout = max(1, int(round(num_scenes * heldout_fraction))) if heldout_fraction > 0 else 0
  splits: dict[str, list] = {"train": [], "heldout": []}
  records, tasks_seen = [], collections.Counter()
  for scene in scenes(
    seed, num_scenes, image_size=image_size, tasks=tasks, workers=workers, progress=progress
  ):
    relative = f"images/{scene.index:05d}.jpg"
    with open(os.path.join(out_dir, relative), "wb") as f:
      f.write(_jpeg(scene.image))
    split = "heldout" if scene.index >= num_scenes - num_heldout else "train"
    for kind, prompt, answer in scene.questions:
      splits[split].append({"image": relative, "prompt": prompt, "answer": answer, "type": kind})
    records.append(
      {
        "image": relative,
        "split": split,
        "task": scene.task,
        "configuration": scene.configuration,
        "facts": scene.facts,
      }
    )
    tasks_seen[scene.task] += 1
  for split, lines in splits.items():
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  with open(os.path.join(out_dir, "scenes.jsonl"), "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)
  summary = summarize(splits["train"] + splits["heldout"])
  summary["by_split"] = {
    split: dict(collections.Counter(line["type"] for line in lines))
    for split, lines in splits.items()
  }
  summary["lines"] = {split: len(lines) for split, lines in splits.items()}
  summary["scenes"] = {"train": num_scenes - num_heldout, "heldout": num_heldout}
  summary["tasks"] = dict(sorted(tasks_seen.items()))
  return summary


def summarize(lines: list[dict]) -> dict[str, Any]:
  """Per type: question count, answer counts, the majority answer's rate (a blind model that
  knows only the type) and the per-prompt majority rate (one that also reads the prompt)."""
  result = {}
  for kind in QUESTION_TYPES:
    of_kind = [line for line in lines if line["type"] == kind]
    answers = collections.Counter(line["answer"] for line in of_kind)
    by_prompt: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in of_kind:
      by_prompt[line["prompt"]][line["answer"]] += 1
    total = len(of_kind)
    result[kind] = {
      "count": total,
      "answers": {word: answers[word] for word in QUESTION_TYPES[kind]},
      "majority_rate": max(answers.values()) / total if total else 0.0,
      "prompt_majority_rate": (
        sum(max(c.values()) for c in by_prompt.values()) / total if total else 0.0
      ),
    }
  return {"types": result}
