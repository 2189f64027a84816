r"""DROID RLDS -> ArrayRecord shards of prepared frames, for large training runs.

`run(Settings(rlds_dir=..., out_dir=...), num_workers=...)`; the command line is
data_prep/droid_to_arrayrecord.py. Each input TFRecord shard becomes one output shard
`droid-train.array_record-NNNNN-of-MMMMM` (group_size:1, so any record can be read at random),
holding one record per kept frame (ki.data.records). Shards are converted in parallel worker
processes. Episodes are read with the dataset's own TFDS features (`deserialize_example_np`) with
image decoding skipped: the JPEG bytes go into the records exactly as stored.

The filters and their counts (ki.data.droid.episode_frames): success, instruction, DROID shapes,
keep-ranges (openpi's published JSON, or openpi's idle rule), finite state and actions. A record
that cannot be parsed or an episode with wrong shapes is skipped, logged and counted; a missing
or unreadable folder or shard stops the job with an error naming it. `manifest.json` records the
counts, the source, the settings and the output shards with their record counts.
"""

import collections
import dataclasses
import json
import multiprocessing
import os
import time

from absl import logging

from ki.data import droid, records

MANIFEST = records.MANIFEST
OUTPUT_PREFIX = "droid-train.array_record"
EPISODES_UNREADABLE = "episodes_dropped_unreadable"


@dataclasses.dataclass(frozen=True)
class Settings:
  rlds_dir: str
  out_dir: str
  action_space: str = "joint_position"
  action_horizon: int = 16
  keep_ranges_json: str | None = None


# Required DROID features and their per-step shapes: a dataset without them cannot be converted.
_REQUIRED = {
  ("observation", "joint_position"): (droid.NUM_JOINTS,),
  ("observation", "gripper_position"): (1,),
  ("action_dict", "joint_position"): (droid.NUM_JOINTS,),
  ("action_dict", "joint_velocity"): (droid.NUM_JOINTS,),
  ("action_dict", "gripper_position"): (1,),
  **{("observation", camera): droid.IMAGE_SHAPE for camera in droid.CAMERA_NAMES},
}


def open_rlds(rlds_dir: str):
  """The TFDS builder of a DROID version folder, after checking its files and feature spec."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  for name in ("dataset_info.json", "features.json"):
    if not tf.io.gfile.exists(os.path.join(rlds_dir, name)):
      raise FileNotFoundError(f"{rlds_dir} is not a TFDS dataset folder: {name} is missing")
  builder = tfds.builder_from_directory(rlds_dir)
  if "train" not in builder.info.splits:
    raise ValueError(f"{rlds_dir} has no 'train' split (splits: {list(builder.info.splits)})")
  features = builder.info.features
  problems = []
  for (group, name), shape in _REQUIRED.items():
    try:
      feature = features["steps"].feature[group][name]
    except KeyError:
      problems.append(f"steps/{group}/{name} is missing")
      continue
    if tuple(feature.shape) != shape:
      problems.append(f"steps/{group}/{name} has shape {feature.shape}, DROID has {shape}")
  if problems:
    raise ValueError(f"{rlds_dir} does not have DROID's features: {'; '.join(problems)}")
  missing = [str(p) for p in builder.info.splits["train"].filepaths if not tf.io.gfile.exists(p)]
  if missing:
    raise FileNotFoundError(f"{rlds_dir}: shards in dataset_info.json are missing: {missing}")
  return builder


def _skip_image_decoding():
  import tensorflow_datasets as tfds

  skip = tfds.decode.SkipDecoding()
  return {"steps": {"observation": {camera: skip for camera in droid.CAMERA_NAMES}}}


def read_episodes(builder, shard_path: str, counts: collections.Counter):
  """Yields (metadata, stacked steps) per episode of one TFRecord shard; bad records are counted."""
  import tensorflow as tf

  decoders = _skip_image_decoding()
  try:
    for index, serialized in enumerate(tf.data.TFRecordDataset(shard_path).as_numpy_iterator()):
      try:
        episode = builder.info.features.deserialize_example_np(serialized, decoders=decoders)
        steps = droid.stack_steps(episode["steps"])
      except Exception as e:  # Protobuf, shape and ragged-step errors all mean: skip it.
        counts[droid.EPISODES_SEEN] += 1
        counts[EPISODES_UNREADABLE] += 1
        logging.warning("%s: skipping unreadable episode record %d: %s", shard_path, index, e)
        continue
      yield episode["episode_metadata"], steps
  except tf.errors.OpError as e:
    raise OSError(f"cannot read shard {shard_path}: {e.message}") from e


def output_path(out_dir: str, index: int, num_shards: int) -> str:
  return os.path.join(out_dir, f"{OUTPUT_PREFIX}-{index:05d}-of-{num_shards:05d}")


def convert_shard(
  builder, shard_path: str, out_path: str, settings: Settings, keep_ranges
) -> tuple[int, collections.Counter]:
  """Converts one input shard into one ArrayRecord shard; returns (records written, counts)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  counts = collections.Counter()
  written = 0
  temporary = out_path + ".incomplete"
  writer = ArrayRecordWriter(temporary, "group_size:1")
  try:
    for metadata, steps in read_episodes(builder, shard_path, counts):
      try:
        frames = droid.episode_frames(
          metadata,
          steps,
          counts,
          action_space=settings.action_space,
          action_horizon=settings.action_horizon,
          keep_ranges_by_episode=keep_ranges,
        )
      except droid.BadEpisodeError as e:
        logging.warning("%s: skipping %s", shard_path, e)
        continue
      for frame in frames:
        writer.write(records.encode_frame(frame))
        written += 1
  finally:
    writer.close()
  os.replace(temporary, out_path)
  return written, counts


# Worker-process state, set once per process by `_init_worker`.
_worker = {}


def _init_worker(settings: Settings, keep_ranges) -> None:
  _worker.update(builder=open_rlds(settings.rlds_dir), settings=settings, keep_ranges=keep_ranges)


def _convert_indexed(task: tuple[int, str, str]):
  index, shard_path, out_path = task
  written, counts = convert_shard(
    _worker["builder"], shard_path, out_path, _worker["settings"], _worker["keep_ranges"]
  )
  return index, written, counts


def run(settings: Settings, *, num_workers: int = 1) -> dict:
  """Converts every shard of `settings.rlds_dir`; writes and returns the manifest."""
  from tqdm import tqdm

  if settings.action_horizon < 1:
    raise ValueError(f"action_horizon must be >= 1, got {settings.action_horizon}")
  builder = open_rlds(settings.rlds_dir)
  keep_ranges = None
  if settings.keep_ranges_json:
    keep_ranges = droid.load_keep_ranges(settings.keep_ranges_json)
  os.makedirs(settings.out_dir, exist_ok=True)
  if os.path.exists(os.path.join(settings.out_dir, MANIFEST)):
    raise FileExistsError(f"{settings.out_dir} already holds a prepared dataset ({MANIFEST})")
  shards = [os.fspath(p) for p in builder.info.splits["train"].filepaths]
  tasks = [(i, s, output_path(settings.out_dir, i, len(shards))) for i, s in enumerate(shards)]
  start = time.time()
  results = {}
  progress = tqdm(total=len(tasks), desc="DROID shards", unit="shard")
  pool = None
  if num_workers <= 1:
    _worker.update(builder=builder, settings=settings, keep_ranges=keep_ranges)
    outputs = map(_convert_indexed, tasks)
  else:
    # Spawned, not forked: TensorFlow's thread pools do not survive a fork.
    pool = multiprocessing.get_context("spawn").Pool(
      num_workers, initializer=_init_worker, initargs=(settings, keep_ranges)
    )
    outputs = pool.imap_unordered(_convert_indexed, tasks)
  try:
    for index, written, counts in outputs:
      results[index] = (written, counts)
      progress.update(1)
      progress.set_postfix(frames=sum(w for w, _ in results.values()))
  finally:
    progress.close()
    if pool is not None:
      # Every result is in, or an error is on its way up: either way the workers can stop now.
      pool.terminate()
      pool.join()
  total = collections.Counter()
  for _, counts in results.values():
    total.update(counts)
  manifest = {
    "source": {
      "rlds_dir": settings.rlds_dir,
      "dataset_name": builder.info.name,
      "dataset_version": str(builder.info.version),
      "num_input_shards": len(shards),
    },
    "settings": {
      "action_space": settings.action_space,
      "action_horizon": settings.action_horizon,
      "keep_ranges_json": settings.keep_ranges_json,
      "idle_filter": "keep_ranges_json" if keep_ranges is not None else "openpi idle rule",
      "record_format": "ki.data.records (msgpack_numpy), ArrayRecord group_size:1",
    },
    "counts": {key: int(total[key]) for key in (*droid.COUNTERS, EPISODES_UNREADABLE)},
    "num_records": sum(written for written, _ in results.values()),
    "shards": [
      {"path": os.path.basename(tasks[i][2]), "records": results[i][0]} for i in range(len(tasks))
    ],
    "seconds": round(time.time() - start, 2),
  }
  with open(os.path.join(settings.out_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  _log_counts(manifest)
  return manifest


def _log_counts(manifest: dict) -> None:
  counts = manifest["counts"]
  logging.info("prepared %d frames in %d shards", manifest["num_records"], len(manifest["shards"]))
  for key in sorted(counts):
    logging.info("  %-38s %d", key, counts[key])
  dropped_bad = counts[droid.EPISODES_DROPPED_BAD] + counts[EPISODES_UNREADABLE]
  if dropped_bad or counts[droid.FRAMES_DROPPED_BAD]:
    logging.warning(
      "skipped bad input: %d episodes, %d frames (see warnings above)",
      dropped_bad,
      counts[droid.FRAMES_DROPPED_BAD],
    )
