"""Writes LeRobot v3.0 datasets: real parquet (pyarrow) + H.264 mp4 (PyAV), lerobot's metadata.

The layout is lerobot's (shared/reference/lerobot_format.md): `data/chunk-000/file-NNN.parquet`
with several episodes per file, `videos/<camera>/chunk-000/file-NNN.mp4` with the same episodes
concatenated (each episode's span given by from/to timestamps), `meta/info.json`,
`meta/tasks.parquet`, `meta/episodes/chunk-000/file-000.parquet` and `meta/stats.json`.
ki.data.lerobot reads the result like any user's dataset. Episodes are added one at a time and
written a file at a time, so a large dataset never sits in memory whole.

Deterministic: the same episodes give byte-identical files (single-threaded encoder, bitexact
container flags).
"""

import json
import os

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_ARROW_TYPES = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64()}


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
  """uint8 [T, H, W, 3] -> an H.264 (yuv420p) mp4 with frame i at t = i / fps, a keyframe every
  2 frames (lerobot's encoder setting: cheap seeks). Deterministic: one encoder thread and
  bitexact muxing, so the bytes depend only on the frames."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = 2
    stream.codec_context.thread_count = 1
    stream.options = {"crf": "18", "threads": "1", "bf": "0", "flags": "+bitexact"}
    for i, array in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
      frame.pts = i
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_parquet(table: pa.Table, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(table, path)


def write_json(value, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def stats(values: np.ndarray) -> dict:
  """lerobot's per-feature statistics of values [N, D]."""
  return {
    "min": values.min(0).tolist(),
    "max": values.max(0).tolist(),
    "mean": values.mean(0).tolist(),
    "std": values.std(0).tolist(),
    "count": [len(values)],
  }


class Writer:
  """A LeRobot v3.0 dataset written episode by episode.

  Args:
    root: the dataset folder (must not exist or be empty).
    fps: frames per second (timestamps are frame_index / fps).
    cameras: {key: (height, width)} video features.
    vectors: {key: (dtype, names)} numeric features [D] ("float32", "float64" or "int64").
    flags: feature keys of per-frame booleans (e.g. "next.success"), stored as bool [1].
    episodes_per_file: episodes per parquet file and per mp4 (lerobot rolls over by size).
    robot_type: info.json's robot_type.
  """

  def __init__(
    self,
    root: str,
    *,
    fps: int,
    cameras: dict[str, tuple[int, int]],
    vectors: dict[str, tuple[str, list[str]]],
    flags: tuple[str, ...] = (),
    episodes_per_file: int = 50,
    robot_type: str = "unknown",
  ):
    if os.path.isdir(root) and os.listdir(root):
      raise FileExistsError(f"{root} is not empty")
    if episodes_per_file < 1:
      raise ValueError(f"episodes_per_file must be >= 1, got {episodes_per_file}")
    unknown = {k: d for k, (d, _) in vectors.items() if d not in _ARROW_TYPES}
    if unknown:
      raise ValueError(f"unsupported vector dtypes {unknown}; use one of {sorted(_ARROW_TYPES)}")
    self.root, self.fps = root, fps
    self.cameras, self.vectors, self.flags = dict(cameras), dict(vectors), tuple(flags)
    self.episodes_per_file, self.robot_type = episodes_per_file, robot_type
    self.tasks: dict[str, int] = {}
    self._pending: list[tuple[int, str, dict]] = []
    self._episode_rows: dict[str, list] = {}
    self._sums: dict[str, list[np.ndarray]] = {key: [] for key in self.vectors}
    self._file_index = 0
    self._frames = 0
    self._episodes = 0

  def add_episode(self, task: str, frames: dict[str, np.ndarray]) -> int:
    """Adds one episode; `frames` has every camera (uint8 [T, H, W, 3]), vector ([T, D]) and
    flag ([T]) key. Returns its episode index."""
    expected = set(self.cameras) | set(self.vectors) | set(self.flags)
    if set(frames) != expected:
      raise ValueError(f"episode keys {sorted(frames)} != the features {sorted(expected)}")
    lengths = {key: len(value) for key, value in frames.items()}
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
      raise ValueError(f"an episode's features must share one non-zero length, got {lengths}")
    for key, shape in self.cameras.items():
      if frames[key].shape[1:] != (*shape, 3) or frames[key].dtype != np.uint8:
        raise ValueError(f"{key}: expected uint8 [T, {shape[0]}, {shape[1]}, 3]")
    index = self._episodes
    self._episodes += 1
    self.tasks.setdefault(task, len(self.tasks))
    self._pending.append((index, task, frames))
    if len(self._pending) == self.episodes_per_file:
      self._flush()
    return index

  def _flush(self) -> None:
    if not self._pending:
      return
    columns: dict[str, list] = {key: [] for key in self.vectors}
    columns.update({key: [] for key in self.flags})
    meta = {key: [] for key in ("timestamp", "frame_index", "episode_index", "index")}
    meta["task_index"] = []
    offset = 0  # frames of this file's videos before the episode
    for index, task, frames in self._pending:
      length = len(next(iter(frames.values())))
      for key in self.vectors:
        values = np.asarray(frames[key], np.float64).reshape(length, -1)
        columns[key].extend(values.tolist())
        self._sums[key].append(values)
      for key in self.flags:
        columns[key].extend(bool(v) for v in np.asarray(frames[key]).reshape(length))
      meta["timestamp"].extend(np.float32(t / self.fps) for t in range(length))
      meta["frame_index"].extend(range(length))
      meta["episode_index"].extend([index] * length)
      meta["index"].extend(range(self._frames, self._frames + length))
      meta["task_index"].extend([self.tasks[task]] * length)
      row = {
        "episode_index": index,
        "tasks": [task],
        "length": length,
        "data/chunk_index": 0,
        "data/file_index": self._file_index,
        "dataset_from_index": self._frames,
        "dataset_to_index": self._frames + length,
      }
      for key in self.cameras:
        row.update(
          {
            f"videos/{key}/chunk_index": 0,
            f"videos/{key}/file_index": self._file_index,
            f"videos/{key}/from_timestamp": offset / self.fps,
            f"videos/{key}/to_timestamp": (offset + length) / self.fps,
          }
        )
      for key in self.vectors:
        for stat, value in stats(np.asarray(frames[key], np.float64).reshape(length, -1)).items():
          row[f"stats/{key}/{stat}"] = value
      for name, value in row.items():
        self._episode_rows.setdefault(name, []).append(value)
      offset += length
      self._frames += length
    arrays = {
      key: pa.array(columns[key], pa.list_(_ARROW_TYPES[dtype]))
      for key, (dtype, _) in self.vectors.items()
    }
    arrays.update({key: pa.array(columns[key], pa.bool_()) for key in self.flags})
    arrays.update(
      timestamp=pa.array(meta["timestamp"], pa.float32()),
      frame_index=pa.array(meta["frame_index"], pa.int64()),
      episode_index=pa.array(meta["episode_index"], pa.int64()),
      index=pa.array(meta["index"], pa.int64()),
      task_index=pa.array(meta["task_index"], pa.int64()),
    )
    path = DATA_PATH.format(chunk_index=0, file_index=self._file_index)
    write_parquet(pa.table(arrays), os.path.join(self.root, path))
    for key in self.cameras:
      path = VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=self._file_index)
      frames = np.concatenate([episode[key] for _, _, episode in self._pending])
      write_video(os.path.join(self.root, path), frames, self.fps)
    self._pending = []
    self._file_index += 1

  def _features(self) -> dict:
    features = {}
    for key, (height, width) in self.cameras.items():
      features[key] = {
        "dtype": "video",
        "shape": [height, width, 3],
        "names": ["height", "width", "channel"],
        "info": {
          "video.height": height,
          "video.width": width,
          "video.codec": "h264",
          "video.pix_fmt": "yuv420p",
          "video.is_depth_map": False,
          "video.fps": self.fps,
          "video.channels": 3,
          "has_audio": False,
        },
      }
    for key, (dtype, names) in self.vectors.items():
      features[key] = {"dtype": dtype, "shape": [len(names)], "names": list(names)}
    for key in self.flags:
      features[key] = {"dtype": "bool", "shape": [1], "names": None}
    for key, dtype in (("timestamp", "float32"), ("frame_index", "int64")):
      features[key] = {"dtype": dtype, "shape": [1], "names": None}
    for key in ("episode_index", "index", "task_index"):
      features[key] = {"dtype": "int64", "shape": [1], "names": None}
    return features

  def finish(self) -> dict:
    """Writes what is pending and the metadata. Returns info.json's contents."""
    if not self._episodes:
      raise ValueError(f"no episodes were added to {self.root}")
    self._flush()
    write_parquet(
      pa.table(self._episode_rows),
      os.path.join(self.root, EPISODES_PATH.format(chunk_index=0, file_index=0)),
    )
    # lerobot writes a pandas frame indexed by the task string; without pandas metadata the
    # index is a plain column, which readers accept under either name.
    names = list(self.tasks)
    write_parquet(
      pa.table({"task_index": pa.array([self.tasks[n] for n in names], pa.int64()), "task": names}),
      os.path.join(self.root, "meta", "tasks.parquet"),
    )
    all_stats = {}
    for key, parts in self._sums.items():
      values = np.concatenate(parts)
      all_stats[key] = stats(values)
      for q in (1, 10, 50, 90, 99):
        all_stats[key][f"q{q:02d}"] = np.quantile(values, q / 100, axis=0).tolist()
    write_json(all_stats, os.path.join(self.root, "meta", "stats.json"))
    info = {
      "codebase_version": CODEBASE_VERSION,
      "robot_type": self.robot_type,
      "fps": self.fps,
      "total_episodes": self._episodes,
      "total_frames": self._frames,
      "total_tasks": len(self.tasks),
      "chunks_size": CHUNKS_SIZE,
      "data_files_size_in_mb": 100,
      "video_files_size_in_mb": 500,
      "splits": {"train": f"0:{self._episodes}"},
      "data_path": DATA_PATH,
      "video_path": VIDEO_PATH if self.cameras else None,
      "features": self._features(),
    }
    write_json(info, os.path.join(self.root, "meta", "info.json"))
    return info
