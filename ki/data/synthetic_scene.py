"""Tabletop scenes and robot trajectories for synthetic DROID: sampling, kinematics and rendering.

The world is a unit table: x runs left to right as seen from exterior camera 1, y runs away from
it, z is height. A scene holds 2-4 coloured blocks and cups. The end effector moves to the target
object along a minimum-jerk path, descends, closes the gripper and lifts. The 7 joints are a fixed
smooth function of the end-effector position (`joints_from_position`), so the action is predictable
from the image and the instruction: a policy has something to learn, unlike with noise.

Views: two exterior cameras (front and side) and a wrist camera that looks down from the gripper
and zooms in as it descends. Rendering is PIL drawing, about a millisecond per image.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from ki.data import droid

COLORS = {
  "red": (215, 40, 40),
  "green": (40, 160, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 40),
  "purple": (140, 60, 180),
  "orange": (240, 130, 30),
}
SHAPES = ("block", "cup")
OBJECT_SIZE = 0.09  # table units
HOVER_HEIGHT = 0.14
GRASP_HEIGHT = 0.04
START_HEIGHT = 0.35

INSTRUCTION_TEMPLATES = (
  "pick up the {color} {shape}",
  "move the gripper to the {color} {shape}",
  "grab the {color} {shape}",
  "reach for the {color} {shape}",
  "put the gripper on the {color} {shape}",
)

_HEIGHT, _WIDTH = droid.IMAGE_SHAPE[:2]
# Fixed joint-space map, the same for every episode: joints = HOME + WEIGHTS @ features(position).
_HOME = np.array([0.0, -0.6, 0.0, -2.2, 0.0, 1.6, 0.8])
_WEIGHTS = np.random.default_rng(20260101).uniform(-1.0, 1.0, (droid.NUM_JOINTS, 6))


@dataclasses.dataclass(frozen=True)
class SceneObject:
  color: str
  shape: str
  x: float
  y: float

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...]
  table_color: tuple[int, int, int]


def sample_scene(rng: np.random.Generator) -> Scene:
  """2-4 objects of distinct colours, at least 0.15 apart left-to-right (so 'left' is defined)."""
  count = int(rng.integers(2, 5))
  colors = rng.choice(list(COLORS), size=count, replace=False)
  while True:
    xs = rng.uniform(0.1, 0.9, count)
    if np.all(np.diff(np.sort(xs)) >= 0.15):
      break
  ys = rng.uniform(0.2, 0.8, count)
  objects = tuple(
    SceneObject(str(c), str(rng.choice(SHAPES)), float(x), float(y))
    for c, x, y in zip(colors, xs, ys)
  )
  shade = int(rng.integers(150, 200))
  return Scene(objects, (shade, int(shade * 0.85), int(shade * 0.65)))


def joints_from_position(position: np.ndarray) -> np.ndarray:
  """The arm's joint angles [..., 7] for end-effector positions [..., 3] (a fixed smooth map)."""
  x, y, z = position[..., 0] - 0.5, position[..., 1] - 0.5, position[..., 2] - 0.3
  features = np.stack([x, y, z, x * y, np.sin(np.pi * x), z * z], axis=-1)
  return _HOME + features @ _WEIGHTS.T


def cartesian_from_position(position: np.ndarray) -> np.ndarray:
  """DROID's cartesian pose [..., 6] (metres in the robot base frame + roll/pitch/yaw)."""
  x, y, z = position[..., 0], position[..., 1], position[..., 2]
  return np.stack(
    [0.35 + 0.4 * y, 0.4 * (0.5 - x), z, np.full_like(x, np.pi), np.zeros_like(x), 0.3 * (x - 0.5)],
    axis=-1,
  )


def _min_jerk(start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
  """[steps, 3] points from just after `start` to `end` along a minimum-jerk profile."""
  s = np.arange(1, steps + 1) / steps
  blend = 10 * s**3 - 15 * s**4 + 6 * s**5
  return start + blend[:, None] * (end - start)


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """Per-step end-effector positions [T, 3] and gripper closure [T] (0 open, 1 closed)."""

  position: np.ndarray
  gripper: np.ndarray
  # Steps that hold perfectly still (for the idle filter); noise is added everywhere else.
  still: np.ndarray


def sample_trajectory(
  rng: np.random.Generator, target: SceneObject, *, idle_start: int, idle_end: int
) -> Trajectory:
  """Reach above the target, descend, close the gripper, lift; optionally idle at both ends."""
  start = np.array([rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.5), START_HEIGHT])
  above = np.array([target.x, target.y, HOVER_HEIGHT])
  grasp = np.array([target.x, target.y, GRASP_HEIGHT])
  lifted = np.array([target.x, target.y, 0.25])
  # The lift outlasts the 10 frames the idle rule drops at the end, so grasps stay in the data.
  reach, descend, close, lift = int(rng.integers(16, 29)), int(rng.integers(6, 9)), 5, 12
  positions = [np.repeat(start[None], idle_start + 1, axis=0)]
  positions.append(_min_jerk(start, above, reach))
  positions.append(_min_jerk(above, grasp, descend))
  positions.append(np.repeat(grasp[None], close, axis=0))
  positions.append(_min_jerk(grasp, lifted, lift))
  positions.append(np.repeat(lifted[None], idle_end, axis=0))
  position = np.concatenate(positions)
  gripper = np.zeros(len(position))
  closing_from = idle_start + 1 + reach + descend
  gripper[closing_from : closing_from + close] = np.linspace(0.2, 1.0, close)
  gripper[closing_from + close :] = 1.0
  still = np.zeros(len(position), bool)
  still[: idle_start + 1] = True
  still[len(position) - idle_end :] = True
  return Trajectory(position, gripper, still)


def joint_trajectory(rng: np.random.Generator, trajectory: Trajectory) -> np.ndarray:
  """[T, 7] joint angles along the trajectory, with small teleoperation jitter while moving.

  The jitter (std 4e-4 rad) makes the commanded velocity change at every moving step, as in real
  teleoperation, while still stretches stay exactly constant: the idle rule sees the difference.
  """
  joints = joints_from_position(trajectory.position)
  jitter = rng.normal(0.0, 4e-4, joints.shape) * ~trajectory.still[:, None]
  return joints + jitter


@dataclasses.dataclass(frozen=True)
class _View:
  """Projects table points to pixels: (u, v) = offset + x * ax_x + y * ax_y + z * ax_z."""

  offset: tuple[float, float]
  axis_x: tuple[float, float]
  axis_y: tuple[float, float]
  axis_z: tuple[float, float]
  scale: float  # pixels per table unit, for object sizes

  def project(self, x: float, y: float, z: float) -> tuple[float, float]:
    return (
      self.offset[0] + x * self.axis_x[0] + y * self.axis_y[0] + z * self.axis_z[0],
      self.offset[1] + x * self.axis_x[1] + y * self.axis_y[1] + z * self.axis_z[1],
    )


# Camera 1 faces the table from the front; camera 2 from the right-hand side.
FRONT_VIEW = _View((40.0, 165.0), (240.0, 0.0), (0.0, -130.0), (0.0, -150.0), 200.0)
SIDE_VIEW = _View((40.0, 35.0), (0.0, 130.0), (240.0, 0.0), (0.0, -150.0), 200.0)
_ARM_BASE = (0.5, 1.2, 0.45)


def _wrist_view(position: np.ndarray) -> _View:
  """Looking straight down from the gripper; the closer to the table, the larger the zoom."""
  zoom = 160.0 / (0.1 + position[2])
  centre_u, centre_v = _WIDTH / 2, _HEIGHT / 2
  return _View(
    (centre_u - zoom * position[0], centre_v + zoom * position[1]),
    (zoom, 0.0),
    (0.0, -zoom),
    (0.0, 0.0),
    zoom,
  )


def _draw_object(draw: ImageDraw.ImageDraw, view: _View, obj: SceneObject) -> None:
  u, v = view.project(obj.x, obj.y, 0.0)
  half = OBJECT_SIZE * view.scale / 2
  color = COLORS[obj.color]
  dark = tuple(int(c * 0.6) for c in color)
  box = (u - half, v - half, u + half, v + half)
  if obj.shape == "block":
    draw.rectangle(box, fill=color, outline=dark, width=2)
  else:
    draw.ellipse(box, fill=color, outline=dark, width=2)
    inner = half * 0.55
    draw.ellipse((u - inner, v - inner, u + inner, v + inner), fill=dark)


def _draw_table(scene: Scene, view: _View) -> Image.Image:
  image = Image.new("RGB", (_WIDTH, _HEIGHT), (70, 70, 78))
  draw = ImageDraw.Draw(image)
  corners = [view.project(x, y, 0.0) for x, y in ((0, 0), (1, 0), (1, 1), (0, 1))]
  draw.polygon(corners, fill=scene.table_color, outline=(40, 40, 40))
  return image


def render_exterior(
  scene: Scene, view: _View, position: np.ndarray | None = None, gripper: float = 0.0
) -> np.ndarray:
  """uint8 [180, 320, 3]: table, objects and (if `position` is given) the arm and gripper."""
  image = _draw_table(scene, view)
  draw = ImageDraw.Draw(image)
  # Painter's order: far objects first (far is +y from the front camera, -x from the side one).
  far_first = sorted(scene.objects, key=lambda o: -o.y if view is FRONT_VIEW else o.x)
  for obj in far_first:
    _draw_object(draw, view, obj)
  if position is not None:
    x, y, z = (float(c) for c in position)
    shadow_u, shadow_v = view.project(x, y, 0.0)
    draw.ellipse((shadow_u - 9, shadow_v - 4, shadow_u + 9, shadow_v + 4), fill=(60, 55, 50))
    gripper_uv = view.project(x, y, z)
    draw.line([view.project(*_ARM_BASE), gripper_uv], fill=(150, 150, 160), width=9)
    u, v = gripper_uv
    opening = 10 * (1.0 - gripper) + 3
    draw.rectangle((u - 12, v - 6, u + 12, v), fill=(50, 50, 55))
    for side in (-1, 1):
      finger_u = u + side * opening
      draw.rectangle((finger_u - 2, v, finger_u + 2, v + 12), fill=(30, 30, 30))
  return np.asarray(image)


def render_wrist(scene: Scene, position: np.ndarray, gripper: float) -> np.ndarray:
  """uint8 [180, 320, 3]: the table under the gripper, with the two fingers at the image bottom."""
  view = _wrist_view(position)
  image = _draw_table(scene, view)
  draw = ImageDraw.Draw(image)
  for obj in scene.objects:
    _draw_object(draw, view, obj)
  opening = 70 * (1.0 - gripper) + 18
  for side in (-1, 1):
    u = _WIDTH / 2 + side * opening
    draw.rectangle((u - 10, _HEIGHT - 45, u + 10, _HEIGHT), fill=(35, 35, 38))
  return np.asarray(image)


def position_word(x: float) -> str:
  """Where an object sits left-to-right as seen from camera 1."""
  return "on the left" if x < 1 / 3 else ("in the middle" if x < 2 / 3 else "on the right")
