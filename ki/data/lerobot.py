"""Local LeRobot datasets (codebase v2.1 and v3.0) as a random-access source of robot frames.

The format facts are in shared/reference/lerobot_format.md. `open_dataset` reads the metadata of
either version into one description (`LeRobotDataset`: features, fps, tasks and, per episode, its
parquet file and its span in each camera's mp4). `LeRobotFrames` is a grain data source over
frames of a chosen subset of episodes (one host's share); item i is

  {"images": {camera key: uint8 [H, W, 3]}, "state": float32 [S], "actions": float32 [H, A],
   "prompt": str, "episode_index": int, "frame_index": int}

or `Dropped(reason)` for bad input, counted by the pipeline (ki/data/pipeline.py):
  corrupt_video  a damaged mp4, whatever part of it is missing: it does not open, does not
                 decode, or ends before the end its own index declares (a file cut short whose
                 index was written first, as lerobot's encoder does, still opens)
  missing_frame  a readable video with no frame within half a frame period of the row's
                 timestamp, or an episode whose rows do not run 0..length-1 (a dropped row)
  corrupt_image  a parquet-embedded image that does not decode
  bad_shape      an episode's parquet file that cannot be read, lacks the spec's columns or
                 holds values of the wrong shape
  short_episode  an episode shorter than the action horizon
  no_instruction the frame's task index names no task (or an empty one)
  non_finite     (in the transform) NaN/inf in state or actions

Action chunks are cut within the episode: rows t .. t+H-1, the last row repeated past the end.
Video frames are found by timestamp (`from_timestamp` + the row's `timestamp`) with PyAV: seek to
the keyframe before it, decode forward, take the nearest frame. Decoded frames of the last group
of pictures are kept per file, so neighbouring frames (a chunk's worth, or eval's in-order reads)
decode once. Open files and parsed parquet tables are cached per process and never pickled, so
the source travels to Grain's worker processes cheaply.
"""

import bisect
import collections
import dataclasses
import io
import json
import os
from typing import Any

import av
import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq

from ki.data.transforms import Dropped

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
CAMERA_DTYPES = ("video", "image")
# Rows every LeRobot frame has besides the features a robot records.
FRAME_FIELDS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


class NotALeRobotDatasetError(ValueError):
  """The folder is not a LeRobot dataset this reader supports; the message says what was found."""


@dataclasses.dataclass(frozen=True)
class Episode:
  """Where one episode lives. `videos`: camera key -> (mp4 path, from_timestamp in seconds)."""

  index: int
  length: int
  data_path: str
  videos: dict[str, tuple[str, float]]


@dataclasses.dataclass(frozen=True)
class LeRobotDataset:
  """The metadata of a local LeRobot dataset, whichever codebase version wrote it."""

  root: str
  version: str
  fps: float
  features: dict[str, dict[str, Any]]
  tasks: dict[int, str]
  episodes: tuple[Episode, ...]

  def camera_keys(self) -> list[str]:
    return [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]

  def describe_features(self) -> str:
    """'key (dtype shape)' for every feature, for error messages."""
    return ", ".join(
      f"{key} ({f.get('dtype')} {list(f.get('shape') or [])})" for key, f in self.features.items()
    )


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def open_dataset(root: str) -> LeRobotDataset:
  """Reads meta/ of a LeRobot dataset folder (v2.0/v2.1 or v3.0, from meta/info.json).

  Raises:
    NotALeRobotDatasetError: naming the folder and what it found instead (no folder, no
      meta/info.json, no codebase_version, an unsupported one, missing metadata files).
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise NotALeRobotDatasetError(f"LeRobot dataset folder not found: {root}")
  info_path = os.path.join(root, "meta", "info.json")
  if not os.path.exists(info_path):
    found = sorted(os.listdir(root))[:20]
    raise NotALeRobotDatasetError(
      f"{root} is not a LeRobot dataset: no meta/info.json (the folder holds {found})"
    )
  try:
    info = _read_json(info_path)
  except (OSError, json.JSONDecodeError) as error:
    raise NotALeRobotDatasetError(f"{root}: meta/info.json is unreadable: {error}") from None
  version = info.get("codebase_version") if isinstance(info, dict) else None
  if version not in SUPPORTED_VERSIONS:
    raise NotALeRobotDatasetError(f"{root}: {_unsupported_version(version)}")
  missing = [k for k in ("fps", "features", "data_path") if k not in info]
  if missing:
    raise NotALeRobotDatasetError(f"{root}: meta/info.json lacks {missing} (has {sorted(info)})")
  features = dict(info["features"])
  video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
  if video_keys and not info.get("video_path"):
    raise NotALeRobotDatasetError(f"{root}: video features {video_keys} but no video_path")
  try:
    if version == "v3.0":
      tasks, episodes = _read_v30(root, info, video_keys)
    else:
      tasks, episodes = _read_v21(root, info, video_keys)
  except (OSError, KeyError, ValueError, pa.ArrowException) as error:
    raise NotALeRobotDatasetError(
      f"{root}: cannot read the {version} metadata: {type(error).__name__}: {error}"
    ) from None
  if not episodes:
    raise NotALeRobotDatasetError(f"{root}: the dataset lists no episodes")
  return LeRobotDataset(root, version, float(info["fps"]), features, tasks, tuple(episodes))


def _version_key(version) -> tuple[int, ...] | None:
  """ "v2.1" -> (2, 1); None for anything else."""
  if not isinstance(version, str) or not version.startswith("v"):
    return None
  parts = version[1:].split(".")
  return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def _unsupported_version(version) -> str:
  """Why `version` is refused: newer than this reader, older, or not a version."""
  readable = ", ".join(SUPPORTED_VERSIONS)
  key = _version_key(version)
  if key is not None and key > max(_version_key(v) for v in SUPPORTED_VERSIONS):
    return (
      f"meta/info.json has codebase_version {version!r}, newer than this reader supports: it "
      f"reads {readable}. Use a copy of the dataset in one of those, or teach "
      "ki/data/lerobot.py the new layout"
    )
  if key is not None:
    return (
      f"meta/info.json has codebase_version {version!r}, older than this reader supports: it "
      f"reads {readable}. Convert the dataset with lerobot's conversion scripts"
    )
  return (
    f"meta/info.json has codebase_version {version!r}, not a version this reader knows: it "
    f"reads {readable}"
  )


def _read_v21(root: str, info: dict, video_keys: list[str]):
  meta = os.path.join(root, "meta")
  tasks = {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(f"{meta}/tasks.jsonl")}
  chunks_size = int(info.get("chunks_size", 1000))
  episodes = []
  for row in _read_jsonl(os.path.join(meta, "episodes.jsonl")):
    index = int(row["episode_index"])
    chunk = index // chunks_size
    data_path = info["data_path"].format(episode_chunk=chunk, episode_index=index)
    videos = {
      key: (
        os.path.join(
          root, info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=index)
        ),
        0.0,
      )
      for key in video_keys
    }
    episodes.append(Episode(index, int(row["length"]), os.path.join(root, data_path), videos))
  return tasks, sorted(episodes, key=lambda e: e.index)


def _read_v30(root: str, info: dict, video_keys: list[str]):
  meta = os.path.join(root, "meta")
  table = pq.read_table(os.path.join(meta, "tasks.parquet"))
  names = [n for n in ("task", "__index_level_0__") if n in table.column_names]
  if not names or "task_index" not in table.column_names:
    raise KeyError(f"meta/tasks.parquet has columns {table.column_names}, expected task strings")
  tasks = dict(
    zip(
      (int(i) for i in table.column("task_index").to_pylist()),
      (str(t) for t in table.column(names[0]).to_pylist()),
    )
  )
  episode_files = sorted(
    os.path.join(folder, name)
    for folder, _, files in os.walk(os.path.join(meta, "episodes"))
    for name in files
    if name.endswith(".parquet")
  )
  if not episode_files:
    raise FileNotFoundError(f"no meta/episodes/*/*.parquet in {root}")
  episodes = []
  for path in episode_files:
    rows = pq.read_table(path).to_pylist()
    for row in rows:
      data_path = info["data_path"].format(
        chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"])
      )
      videos = {}
      for key in video_keys:
        video_path = info["video_path"].format(
          video_key=key,
          chunk_index=int(row[f"videos/{key}/chunk_index"]),
          file_index=int(row[f"videos/{key}/file_index"]),
        )
        videos[key] = (os.path.join(root, video_path), float(row[f"videos/{key}/from_timestamp"]))
      episode = Episode(
        int(row["episode_index"]), int(row["length"]), os.path.join(root, data_path), videos
      )
      episodes.append(episode)
  return tasks, sorted(episodes, key=lambda e: e.index)


def column_array(table: pa.Table, name: str) -> np.ndarray:
  """A numeric column as numpy: scalars [N], (fixed-size) lists [N, D]."""
  column = table.column(name).combine_chunks()
  if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)
  return column.to_numpy(zero_copy_only=False)


@dataclasses.dataclass
class EpisodeRows:
  """One episode's numeric rows, in frame order. images: camera key -> [T] encoded bytes."""

  frame_index: np.ndarray
  timestamp: np.ndarray
  task_index: np.ndarray
  state: np.ndarray
  actions: np.ndarray
  images: dict[str, list]


class DamagedVideoError(RuntimeError):
  """A video file whose frames end before the end its own index declares."""


def _declared_end(stream) -> float | None:
  """The end of the video stream in seconds as the file's index (the mp4 moov box) declares it,
  or None when the file does not say."""
  if stream.duration is None:
    return None
  start = stream.start_time or 0
  return float((start + stream.duration) * stream.time_base)


def _ends_early(stream, frames: list[tuple[float, np.ndarray]]) -> bool:
  """Whether decoding ran out of frames before the declared end: more than half a frame period
  short of it (the last frame's time + one period is the end of a complete file)."""
  end = _declared_end(stream)
  rate = stream.average_rate or stream.guessed_rate
  if end is None or not rate:
    return False
  period = 1.0 / float(rate)
  last = frames[-1][0] if frames else None
  return last is None or last + period < end - period / 2


class VideoDecoder:
  """Decodes single frames by timestamp from mp4 files; caches open files and the frames of the
  last decoded stretch of each file (per process)."""

  def __init__(self, max_open: int = 16):
    self._max_open = max_open
    self._containers: collections.OrderedDict[str, Any] = collections.OrderedDict()
    self._decoded: dict[str, list[tuple[float, np.ndarray]]] = {}

  def _container(self, path: str):
    if path in self._containers:
      self._containers.move_to_end(path)
      return self._containers[path]
    container = av.open(path)
    # One decode thread: Grain runs a worker process per core, so threads would only compete.
    container.streams.video[0].codec_context.thread_count = 1
    self._containers[path] = container
    if len(self._containers) > self._max_open:
      old_path, old = self._containers.popitem(last=False)
      self._decoded.pop(old_path, None)
      old.close()
    return container

  def _drop(self, path: str) -> None:
    container = self._containers.pop(path, None)
    self._decoded.pop(path, None)
    if container is not None:
      container.close()

  @staticmethod
  def _nearest(frames, time: float, tolerance: float) -> np.ndarray | None:
    if not frames or not frames[0][0] - tolerance <= time <= frames[-1][0] + tolerance:
      return None
    best_time, best = min(frames, key=lambda f: abs(f[0] - time))
    return best if abs(best_time - time) <= tolerance else None

  def frame_at(self, path: str, time: float, tolerance: float, lookahead: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: the frame of `path` nearest to `time` seconds.

    Decodes from the keyframe before `time` up to `lookahead` frames past it (kept for the next
    calls).

    Raises:
      av.FFmpegError / OSError: the file does not open or decode.
      DamagedVideoError: the frames run out before the end the file's index declares (a file cut
        short whose index comes first still opens, and its decoder simply stops).
      LookupError: a readable file with no frame within `tolerance` of `time`.
    """
    cached = self._nearest(self._decoded.get(path), time, tolerance)
    if cached is not None:
      return cached
    try:
      container = self._container(path)
      stream = container.streams.video[0]
      container.seek(max(0, int((time - tolerance) / stream.time_base)), stream=stream)
      frames, past, ran_out = [], 0, True
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        if frame.time > time + tolerance:
          past += 1
        frames.append((float(frame.time), frame.to_ndarray(format="rgb24")))
        if past > lookahead:
          ran_out = False
          break
    except Exception:
      self._drop(path)
      raise
    self._decoded[path] = frames
    found = self._nearest(frames, time, tolerance)
    if found is None:
      if ran_out and _ends_early(stream, frames):
        self._drop(path)
        raise DamagedVideoError(
          f"{path}: decoding stops at t={frames[-1][0] if frames else time:.4f}s but the file's "
          f"index declares {_declared_end(stream):.4f}s: the file is cut short or damaged"
        )
      raise LookupError(f"{path}: no frame within {tolerance:.4f}s of t={time:.4f}s")
    return found

  def close(self) -> None:
    for path in list(self._containers):
      self._drop(path)


def decode_image(value: Any) -> np.ndarray:
  """A parquet image cell ({"bytes", "path"} struct, or raw bytes) -> uint8 [H, W, 3]."""
  data = value.get("bytes") if isinstance(value, dict) else value
  if not data:
    raise ValueError("empty image cell")
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


class LeRobotFrames:
  """A grain random-access source over the frames of some episodes of a LeRobot dataset.

  Args:
    dataset: the opened metadata (`open_dataset`).
    cameras: the camera feature keys to read (video or image features).
    state_key, action_key: the numeric features for the state [S] and the actions [A].
    action_horizon: H, the chunk length.
    episodes: positions in dataset.episodes to read (a host's share); None = all.
    lookahead: extra video frames decoded past each requested one and cached (sequential reads).
  """

  def __init__(
    self,
    dataset: LeRobotDataset,
    *,
    cameras: tuple[str, ...],
    state_key: str,
    action_key: str,
    action_horizon: int,
    episodes: list[int] | None = None,
    lookahead: int = 0,
  ):
    self.dataset = dataset
    self.cameras = tuple(cameras)
    self.state_key, self.action_key = state_key, action_key
    self.action_horizon = action_horizon
    positions = range(len(dataset.episodes)) if episodes is None else episodes
    self.episodes = [dataset.episodes[i] for i in positions]
    self._starts = np.cumsum([0] + [e.length for e in self.episodes]).tolist()
    self.lookahead = lookahead
    # Half a frame period: the nearest frame is the right one; a missing frame is > 1 period off.
    self.tolerance = 0.5 / dataset.fps - 1e-6
    self._init_caches()

  def _init_caches(self) -> None:
    self._decoder = VideoDecoder()
    self._tables: collections.OrderedDict[str, dict[int, EpisodeRows] | Exception] = (
      collections.OrderedDict()
    )

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_decoder"], state["_tables"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def __len__(self) -> int:
    return self._starts[-1]

  def __repr__(self) -> str:
    return f"LeRobotFrames({self.dataset.root}, {len(self.episodes)} episodes, {len(self)} frames)"

  def locate(self, index: int) -> tuple[Episode, int]:
    """(episode, frame within it) of item `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"frame {index} not in [0, {len(self)})")
    position = bisect.bisect_right(self._starts, index) - 1
    return self.episodes[position], index - self._starts[position]

  def _image_columns(self) -> list[str]:
    return [k for k in self.cameras if self.dataset.features[k]["dtype"] == "image"]

  def _load_file(self, path: str) -> dict[int, EpisodeRows]:
    """All episodes' rows of one parquet file (state, actions, timestamps; embedded images)."""
    columns = [self.state_key, self.action_key, "timestamp", "frame_index", "episode_index"]
    columns += ["task_index"] + self._image_columns()
    table = pq.read_table(path, columns=columns)
    episode_index = column_array(table, "episode_index").astype(np.int64)
    frame_index = column_array(table, "frame_index").astype(np.int64)
    result = {}
    for episode in np.unique(episode_index):
      rows = np.flatnonzero(episode_index == episode)
      rows = rows[np.argsort(frame_index[rows], kind="stable")]
      taken = table.take(pa.array(rows))
      result[int(episode)] = EpisodeRows(
        frame_index=frame_index[rows],
        timestamp=column_array(taken, "timestamp").astype(np.float64).reshape(-1),
        task_index=column_array(taken, "task_index").astype(np.int64).reshape(-1),
        state=column_array(taken, self.state_key).astype(np.float32).reshape(len(rows), -1),
        actions=column_array(taken, self.action_key).astype(np.float32).reshape(len(rows), -1),
        images={k: taken.column(k).to_pylist() for k in self._image_columns()},
      )
    return result

  def episode_rows(self, episode: Episode) -> EpisodeRows:
    """The episode's rows (its parquet file is read once per process and kept, 4 files at most).

    Raises:
      OSError / pyarrow errors for an unreadable file; KeyError when the episode has no rows.
    """
    tables = self._tables
    if episode.data_path not in tables:
      try:
        tables[episode.data_path] = self._load_file(episode.data_path)
      except (OSError, pa.ArrowException, KeyError) as error:
        tables[episode.data_path] = error
      if len(tables) > 4:
        tables.popitem(last=False)
    entry = tables[episode.data_path]
    if isinstance(entry, Exception):
      raise entry
    return entry[episode.index]

  def __getitem__(self, index: int) -> dict[str, Any] | Dropped:
    episode, t = self.locate(index)
    if episode.length < self.action_horizon:
      return Dropped("short_episode")
    try:
      rows = self.episode_rows(episode)
    except (OSError, pa.ArrowException, KeyError, ValueError):
      return Dropped("bad_shape")
    if len(rows.frame_index) != episode.length or rows.frame_index[t] != t:
      return Dropped("missing_frame")
    task = self.dataset.tasks.get(int(rows.task_index[t]), "")
    if not task.strip():
      return Dropped("no_instruction")
    chunk_rows = np.minimum(np.arange(t, t + self.action_horizon), episode.length - 1)
    images = {}
    for key in self.cameras:
      if key in rows.images:
        try:
          images[key] = decode_image(rows.images[key][t])
        except Exception:  # PIL raises many types for bad bytes
          return Dropped("corrupt_image")
        continue
      path, start = episode.videos[key]
      try:
        images[key] = self._decoder.frame_at(
          path, start + float(rows.timestamp[t]), self.tolerance, self.lookahead
        )
      except LookupError:
        return Dropped("missing_frame")
      except (av.FFmpegError, OSError, IndexError, ValueError, DamagedVideoError):
        return Dropped("corrupt_video")
    return {
      "images": images,
      "state": rows.state[t],
      "actions": rows.actions[chunk_rows],
      "prompt": task,
      "episode_index": episode.index,
      "frame_index": t,
    }


def split_episodes(
  num_episodes: int, *, split: str, eval_episodes: int, process_index: int, process_count: int
) -> list[int]:
  """Episode positions of one host: the last `eval_episodes` are the eval split, the rest train;
  host k of n takes positions k, k + n, ... of its split (disjoint, whole episodes).

  Raises:
    ValueError when the split leaves this host no episode.
  """
  if not 0 <= eval_episodes < num_episodes:
    raise ValueError(
      f"eval episodes {eval_episodes} must be in [0, {num_episodes}) for {num_episodes} episodes"
    )
  first_eval = num_episodes - eval_episodes
  positions = list(range(first_eval)) if split == "train" else list(range(first_eval, num_episodes))
  mine = positions[process_index::process_count]
  if not mine:
    raise ValueError(
      f"host {process_index} of {process_count} gets no {split} episodes ({len(positions)} in all)"
    )
  return mine
