"""Synthetic LeRobot datasets (codebase v2.1 and v3.0) with LIBERO's feature spec.

Real files, as `lerobot` lays them out (shared/reference/lerobot_format.md): parquet frames
written with pyarrow, one H.264 mp4 per camera (per episode in v2.1, several episodes
concatenated in v3.0) encoded with PyAV, and the metadata files of each version. No `lerobot`
package is involved.

Features (LIBERO as published for openpi):
  image, wrist_image  uint8 [S, S, 3]  video (or PNG bytes in parquet with image_storage="image")
  state               float32 [8]      end-effector position (3), axis-angle (3), finger qpos (2)
  actions             float32 [7]      end-effector position/rotation deltas (6), gripper -1/+1
The scenes and trajectories are synthetic DROID's (ki.data.synthetic_scene): reach, descend,
grasp and lift the object named in the task, so the action is predictable from the image and the
prompt. Each episode depends only on (seed, episode index); the same arguments give
byte-identical files (single-threaded encoder, bitexact container flags).
"""

import io
import json
import os

import numpy as np
from PIL import Image
import pyarrow as pa

from ki.data import lerobot_writer, synthetic_scene

VERSIONS = ("v2.1", "v3.0")
CAMERAS = ("image", "wrist_image")
STATE_KEY, ACTION_KEY = "state", "actions"
STATE_DIM, ACTION_DIM = 8, 7
FPS = 10
CHUNKS_SIZE = 1000
# LIBERO's actions are end-effector deltas scaled to about [-1, 1]; the same scale here.
POSITION_ACTION_SCALE = 15.0
ROTATION_ACTION_SCALE = 3.0
FINGER_OPEN = 0.04
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"


def _shape(image_size: int | tuple[int, int]) -> tuple[int, int]:
  """(height, width) from a side length or a (height, width) pair."""
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


def make_episode(seed: int, index: int, image_size: int | tuple[int, int]) -> dict:
  """One episode: {"task": str, "state": [T, 8], "actions": [T, 7], "<camera>": uint8 [T, H, W, 3]}
  (`image_size`: a side length, or (height, width) such as DROID's (180, 320)).

  The action at step t moves the end effector to its position at t + 1 (the last step holds);
  the gripper command is +1 (close) from the step the gripper starts closing, else -1 (open).
  """
  rng = np.random.default_rng([seed, index])
  scene = synthetic_scene.sample_scene(rng)
  target = scene.objects[int(rng.integers(len(scene.objects)))]
  idle_start = int(rng.integers(0, 3))
  trajectory = synthetic_scene.sample_trajectory(rng, target, idle_start=idle_start, idle_end=2)
  template = synthetic_scene.INSTRUCTION_TEMPLATES[int(rng.integers(3))]
  task = template.format(color=target.color, shape=target.shape)

  position, closure = trajectory.position, trajectory.gripper
  length = len(position)
  pose = synthetic_scene.cartesian_from_position(position)
  rotation = pose[:, 3:6] + rng.normal(0.0, 0.01, (length, 3))
  finger = FINGER_OPEN * (1.0 - closure)
  state = np.concatenate([position, rotation, finger[:, None], -finger[:, None]], axis=1)
  following = np.minimum(np.arange(length) + 1, length - 1)
  gripper_command = np.where(closure[following] > 0, 1.0, -1.0)
  actions = np.concatenate(
    [
      (position[following] - position) * POSITION_ACTION_SCALE,
      (rotation[following] - rotation) * ROTATION_ACTION_SCALE,
      gripper_command[:, None],
    ],
    axis=1,
  )

  height, width = _shape(image_size)

  def square(image: np.ndarray) -> np.ndarray:
    resized = Image.fromarray(image).resize((width, height), Image.BILINEAR)
    return np.asarray(resized, np.uint8)

  front = [
    square(synthetic_scene.render_exterior(scene, synthetic_scene.FRONT_VIEW, p, float(g)))
    for p, g in zip(position, closure)
  ]
  wrist = [
    square(synthetic_scene.render_wrist(scene, p, float(g))) for p, g in zip(position, closure)
  ]
  return {
    "task": task,
    STATE_KEY: state.astype(np.float32),
    ACTION_KEY: actions.astype(np.float32),
    CAMERAS[0]: np.stack(front),
    CAMERAS[1]: np.stack(wrist),
  }


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _features(image_size: int | tuple[int, int], image_storage: str) -> dict:
  height, width = _shape(image_size)
  camera = {
    "dtype": image_storage,
    "shape": [height, width, 3],
    "names": ["height", "width", "channel"],
  }
  if image_storage == "video":
    camera["info"] = {
      "video.height": height,
      "video.width": width,
      "video.codec": "h264",
      "video.pix_fmt": "yuv420p",
      "video.is_depth_map": False,
      "video.fps": FPS,
      "video.channels": 3,
      "has_audio": False,
    }
  scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}  # noqa: E731
  return {
    **{key: dict(camera) for key in CAMERAS},
    STATE_KEY: {
      "dtype": "float32",
      "shape": [STATE_DIM],
      "names": [f"state_{i}" for i in range(8)],
    },
    ACTION_KEY: {"dtype": "float32", "shape": [ACTION_DIM], "names": [f"a_{i}" for i in range(7)]},
    "timestamp": scalar("float32"),
    "frame_index": scalar("int64"),
    "episode_index": scalar("int64"),
    "index": scalar("int64"),
    "task_index": scalar("int64"),
  }


_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _frame_table(episodes: list[tuple[int, dict]], start_index: int, tasks: dict, storage: str):
  """The frame rows of consecutive episodes as one pyarrow table."""
  columns = {key: [] for key in ("state", "actions", "timestamp", "frame_index", "episode_index")}
  columns.update({"index": [], "task_index": []})
  images = {key: [] for key in CAMERAS}
  index = start_index
  for episode_index, episode in episodes:
    for t in range(len(episode[STATE_KEY])):
      columns["state"].append(episode[STATE_KEY][t].tolist())
      columns["actions"].append(episode[ACTION_KEY][t].tolist())
      columns["timestamp"].append(np.float32(t / FPS))
      columns["frame_index"].append(t)
      columns["episode_index"].append(episode_index)
      columns["index"].append(index)
      columns["task_index"].append(tasks[episode["task"]])
      index += 1
      if storage == "image":
        for key in CAMERAS:
          images[key].append({"bytes": _png(episode[key][t]), "path": f"frame_{index:06d}.png"})
  arrays = {
    STATE_KEY: pa.array(columns["state"], pa.list_(pa.float32())),
    ACTION_KEY: pa.array(columns["actions"], pa.list_(pa.float32())),
    "timestamp": pa.array(columns["timestamp"], pa.float32()),
    "frame_index": pa.array(columns["frame_index"], pa.int64()),
    "episode_index": pa.array(columns["episode_index"], pa.int64()),
    "index": pa.array(columns["index"], pa.int64()),
    "task_index": pa.array(columns["task_index"], pa.int64()),
  }
  if storage == "image":
    arrays.update({key: pa.array(images[key], _IMAGE_TYPE) for key in CAMERAS})
  return pa.table(arrays)


def _write_jsonl(rows: list[dict], path: str) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row, sort_keys=True) + "\n")


def generate(
  out_dir: str,
  *,
  version: str = "v3.0",
  episodes: int = 8,
  seed: int = 0,
  image_size: int | tuple[int, int] = 64,
  image_storage: str = "video",
  episodes_per_file: int = 4,
) -> dict:
  """Writes a LeRobot dataset into `out_dir` (which must not exist or be empty).

  Args:
    version: "v2.1" (one parquet and one mp4 per episode) or "v3.0" (`episodes_per_file`
      episodes per parquet and per mp4; lerobot rolls files over by size, here by count).
    image_storage: "video" (mp4) or "image" (PNG bytes inside the parquet rows).

  Returns:
    {"episodes": [{"episode_index", "length", "task"}], "total_frames": int}.
  """
  if version not in VERSIONS:
    raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
  if image_storage not in ("video", "image"):
    raise ValueError(f"image_storage must be 'video' or 'image', got {image_storage!r}")
  if episodes < 1:
    raise ValueError(f"episodes must be >= 1, got {episodes}")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty")
  data = [(i, make_episode(seed, i, image_size)) for i in range(episodes)]
  tasks: dict[str, int] = {}
  for _, episode in data:
    tasks.setdefault(episode["task"], len(tasks))
  total_frames = sum(len(e[STATE_KEY]) for _, e in data)
  video = image_storage == "video"
  info = {
    "codebase_version": version,
    "robot_type": "panda",
    "fps": FPS,
    "total_episodes": episodes,
    "total_frames": total_frames,
    "total_tasks": len(tasks),
    "chunks_size": CHUNKS_SIZE,
    "splits": {"train": f"0:{episodes}"},
    "data_path": V21_DATA_PATH if version == "v2.1" else V30_DATA_PATH,
    "video_path": (V21_VIDEO_PATH if version == "v2.1" else V30_VIDEO_PATH) if video else None,
    "features": _features(image_size, image_storage),
  }
  if version == "v2.1":
    info.update(total_chunks=1, total_videos=episodes * len(CAMERAS) * video)
    _write_v21(out_dir, data, tasks, image_storage)
  else:
    info.update(data_files_size_in_mb=100, video_files_size_in_mb=500)
    _write_v30(out_dir, data, tasks, image_storage, episodes_per_file)
  lerobot_writer.write_json(info, os.path.join(out_dir, "meta", "info.json"))
  return {
    "episodes": [
      {"episode_index": i, "length": len(e[STATE_KEY]), "task": e["task"]} for i, e in data
    ],
    "total_frames": total_frames,
  }


def _write_v21(out_dir: str, data: list, tasks: dict, storage: str) -> None:
  index = 0
  episode_rows, stats_rows = [], []
  for episode_index, episode in data:
    chunk = episode_index // CHUNKS_SIZE
    table = _frame_table([(episode_index, episode)], index, tasks, storage)
    path = V21_DATA_PATH.format(episode_chunk=chunk, episode_index=episode_index)
    lerobot_writer.write_parquet(table, os.path.join(out_dir, path))
    if storage == "video":
      for key in CAMERAS:
        path = V21_VIDEO_PATH.format(
          episode_chunk=chunk, video_key=key, episode_index=episode_index
        )
        lerobot_writer.write_video(os.path.join(out_dir, path), episode[key], FPS)
    length = len(episode[STATE_KEY])
    index += length
    episode_rows.append(
      {"episode_index": episode_index, "tasks": [episode["task"]], "length": length}
    )
    stats_rows.append(
      {
        "episode_index": episode_index,
        "stats": {key: lerobot_writer.stats(episode[key]) for key in (STATE_KEY, ACTION_KEY)},
      }
    )
  meta = os.path.join(out_dir, "meta")
  os.makedirs(meta, exist_ok=True)
  _write_jsonl(episode_rows, os.path.join(meta, "episodes.jsonl"))
  _write_jsonl(stats_rows, os.path.join(meta, "episodes_stats.jsonl"))
  _write_jsonl(
    [{"task_index": i, "task": task} for task, i in tasks.items()],
    os.path.join(meta, "tasks.jsonl"),
  )


def _write_v30(out_dir: str, data: list, tasks: dict, storage: str, episodes_per_file: int) -> None:
  if episodes_per_file < 1:
    raise ValueError(f"episodes_per_file must be >= 1, got {episodes_per_file}")
  rows = {key: [] for key in ("episode_index", "tasks", "length", "data/chunk_index")}
  rows.update({"data/file_index": [], "dataset_from_index": [], "dataset_to_index": []})
  for key in CAMERAS if storage == "video" else ():
    for field in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
      rows[f"videos/{key}/{field}"] = []
  index = 0
  for file_index, start in enumerate(range(0, len(data), episodes_per_file)):
    group = data[start : start + episodes_per_file]
    table = _frame_table(group, index, tasks, storage)
    path = V30_DATA_PATH.format(chunk_index=0, file_index=file_index)
    lerobot_writer.write_parquet(table, os.path.join(out_dir, path))
    offset = 0  # frames of this file's video before the episode
    for episode_index, episode in group:
      length = len(episode[STATE_KEY])
      rows["episode_index"].append(episode_index)
      rows["tasks"].append([episode["task"]])
      rows["length"].append(length)
      rows["data/chunk_index"].append(0)
      rows["data/file_index"].append(file_index)
      rows["dataset_from_index"].append(index)
      rows["dataset_to_index"].append(index + length)
      for key in CAMERAS if storage == "video" else ():
        rows[f"videos/{key}/chunk_index"].append(0)
        rows[f"videos/{key}/file_index"].append(file_index)
        rows[f"videos/{key}/from_timestamp"].append(offset / FPS)
        rows[f"videos/{key}/to_timestamp"].append((offset + length) / FPS)
      offset += length
      index += length
    if storage == "video":
      for key in CAMERAS:
        path = V30_VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=file_index)
        frames = np.concatenate([episode[key] for _, episode in group])
        lerobot_writer.write_video(os.path.join(out_dir, path), frames, FPS)
  for key in (STATE_KEY, ACTION_KEY):
    for stat in ("min", "max", "mean", "std"):
      rows[f"stats/{key}/{stat}"] = [lerobot_writer.stats(e[key])[stat] for _, e in data]
  episodes_path = os.path.join(out_dir, V30_EPISODES_PATH.format(chunk_index=0, file_index=0))
  lerobot_writer.write_parquet(pa.table(rows), episodes_path)
  # lerobot writes a pandas frame indexed by the task string; without pandas metadata the index
  # is a plain column, which readers accept under either name.
  names = list(tasks)
  lerobot_writer.write_parquet(
    pa.table({"task_index": pa.array([tasks[n] for n in names], pa.int64()), "task": names}),
    os.path.join(out_dir, "meta", "tasks.parquet"),
  )
  everything = {key: np.concatenate([e[key] for _, e in data]) for key in (STATE_KEY, ACTION_KEY)}
  stats = {}
  for key, values in everything.items():
    stats[key] = lerobot_writer.stats(values)
    for q in (1, 10, 50, 90, 99):
      stats[key][f"q{q:02d}"] = np.quantile(values, q / 100, axis=0).tolist()
  lerobot_writer.write_json(stats, os.path.join(out_dir, "meta", "stats.json"))
