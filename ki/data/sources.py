"""Data sources: prepared ArrayRecord frames, streamed DROID RLDS, and VLM co-training examples.

Every source yields records in one of two shapes, so the same transforms (ki/data/transforms.py)
apply whatever the origin:
  robot frame: the prepared-frame dict of ki/data/records.py (JPEG bytes, state [8], actions [H, 8],
               three instructions, episode id and step);
  VLM example: {"image": image bytes, "prompt": str, "answer": str}.
A record that cannot be read becomes `transforms.Dropped(reason)` and is counted downstream.

Random-access sources (ArrayRecord frames, JSONL manifests, TFDS sets in array_record format) are
`grain.MapDataset`s: the pipeline shuffles them globally and slices them per host. TFRecord-based
TFDS sets (DROID's RLDS release) cannot be indexed, so they are `grain.IterDataset`s that split
the shard files across readers (hosts x worker processes) and keep their position (epoch, shard,
record, item within the record) in the iterator state, which makes a restore continue exactly.
"""

import collections
from collections.abc import Callable, Sequence
import json
import os
import posixpath
from typing import Any

import grain
import numpy as np

from ki.data import droid, records
from ki.data.transforms import Dropped


def _gfile():
  # TensorFlow is imported lazily: it is heavy, and only needed for gs:// paths and TFRecords.
  import tensorflow as tf

  return tf.io.gfile


def _require_dir(path: str, what: str) -> None:
  if not path:
    raise ValueError(f"{what}: no folder given")
  if not _gfile().isdir(path):
    raise FileNotFoundError(f"{what}: folder not found or unreadable: {path}")


# ------------------------------------------------------------------------------------------------
# Prepared ArrayRecord frames.


def find_arrayrecord_files(path: str) -> list[str]:
  """The ArrayRecord shards of a prepared dataset: `path` is a folder, a glob, or one file.

  Raises:
    FileNotFoundError: naming the folder/pattern when nothing matches or a file is unreadable.
  """
  gfile = _gfile()
  if gfile.isdir(path):
    files = sorted(gfile.glob(posixpath.join(path, "*.array_record*")))
    # data_prep.droid_to_arrayrecord writes each shard as `<name>.incomplete` and renames it when
    # done: a leftover one is from a crashed run, not data.
    files = [f for f in files if not f.endswith(".incomplete")]
    if not files:
      raise FileNotFoundError(f"no *.array_record* shards in folder {path}")
  else:
    files = sorted(gfile.glob(path)) if any(c in path for c in "*?[") else [path]
    if not files:
      raise FileNotFoundError(f"no ArrayRecord shards match {path}")
  for file in files:
    if not gfile.exists(file):
      raise FileNotFoundError(f"ArrayRecord shard not found: {file}")
  return files


class ArrayRecordShards:
  """The records of several ArrayRecord shards as one random-access sequence (what
  grain.MapDataset.source reads), one grain ArrayRecordDataSource per shard, so that a record that
  cannot be read is named by its shard.

  A shard can go bad while training runs: overwritten, truncated or deleted on a shared file
  system, or unreadable on a failing disk. Reading such a record raises OSError naming the shard
  and the record, or, with `skip_unreadable`, gives Dropped("unreadable_record"), which the
  pipeline counts (data/dropped/unreadable_record) and skips. Either way in the worker process
  that read it too: Grain passes the error to the trainer, nothing waits on a dead reader.
  """

  def __init__(self, files: Sequence[str], *, skip_unreadable: bool = False):
    self._files = list(files)
    self._skip_unreadable = skip_unreadable
    self._shards = []
    for file in self._files:
      try:
        self._shards.append(grain.sources.ArrayRecordDataSource([file]))
      except Exception as error:  # array_record's errors do not name the file
        raise ValueError(f"cannot read ArrayRecord shard {file}: {error}") from None
    self._ends = np.cumsum([len(shard) for shard in self._shards])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, index: int) -> bytes | Dropped:
    shard = int(np.searchsorted(self._ends, index, side="right"))
    record = index - (int(self._ends[shard - 1]) if shard else 0)
    try:
      data = self._shards[shard][record]
      if not data:
        # What array_record gives for a record past the end of a shard truncated under it.
        raise OSError("the record is empty (the shard was truncated?)")
    except Exception as error:  # riegeli/array_record raise RuntimeError, OSError, ValueError
      if self._skip_unreadable:
        return Dropped("unreadable_record")
      raise OSError(
        f"cannot read record {record} of ArrayRecord shard {self._files[shard]}: {error} "
        "(restore the shard, or set data.skip_unreadable_records=True to skip and count such "
        "records)"
      ) from None
    return data

  def __repr__(self) -> str:
    return f"ArrayRecordShards({len(self._files)} shards)"


def decode_frame_record(data: bytes | Dropped) -> dict[str, Any] | Dropped:
  """One ArrayRecord record -> the frame dict, or Dropped naming why it is unusable."""
  if isinstance(data, Dropped):
    return data
  try:
    return records.decode_frame(data)
  except ValueError as error:
    # records.validate_frame rejects NaN/inf with a message saying "non-finite".
    return Dropped("non_finite" if "non-finite" in str(error) else "bad_shape")


def arrayrecord_frames(path: str, *, skip_unreadable: bool = False) -> grain.MapDataset:
  """MapDataset over all frames in the prepared shards at `path` (dict or Dropped elements).
  skip_unreadable: see ArrayRecordShards."""
  source = ArrayRecordShards(find_arrayrecord_files(path), skip_unreadable=skip_unreadable)
  if len(source) == 0:
    raise ValueError(f"the ArrayRecord shards at {path} hold no records")
  return grain.MapDataset.source(source).map(decode_frame_record)


# ------------------------------------------------------------------------------------------------
# TFDS datasets stored as TFRecord shards, streamed.


def open_tfds_builder(builder_dir: str, *, what: str):
  """tfds.builder_from_directory with an error that names the folder when it is not a dataset."""
  import tensorflow_datasets as tfds

  _require_dir(builder_dir, what)
  info_path = posixpath.join(builder_dir, "dataset_info.json")
  if not _gfile().exists(info_path):
    raise FileNotFoundError(f"{what}: {builder_dir} has no dataset_info.json (not a TFDS folder)")
  try:
    return tfds.builder_from_directory(builder_dir)
  except Exception as error:
    raise ValueError(f"{what}: cannot open TFDS dataset at {builder_dir}: {error}") from error


def tfds_shard_files(builder, builder_dir: str, split: str, *, what: str) -> list[str]:
  """The shard files of `split`, checked to exist."""
  if split not in builder.info.splits:
    raise ValueError(
      f"{what}: split {split!r} not in {builder_dir} (has {list(builder.info.splits)})"
    )
  files = [posixpath.join(builder_dir, name) for name in builder.info.splits[split].filenames]
  gfile = _gfile()
  for file in files:
    if not gfile.exists(file):
      raise FileNotFoundError(f"{what}: shard listed in dataset_info.json is missing: {file}")
  return files


class ShardedTfdsIterDataset(grain.IterDataset):
  """Streams a TFRecord TFDS split; each serialized example expands into a list of records.

  Readers (hosts x worker processes) split the work: with at least as many shards as readers,
  reader k of n reads shards k, k + n, ...; with fewer (small co-training sets), every reader
  reads all shards and keeps records k, k + n, ... . `set_slice` is Grain's hook for mp_prefetch
  to give each worker process its part.

  The iterator state is {"epoch", "shard", "record", "item"}: the position in this reader's shard
  order (reshuffled per epoch from `seed`), the record within the shard, and the next item of that
  record's expansion. Restoring re-reads the shard up to `record` (TFRecords cannot seek by index).
  """

  def __init__(
    self,
    builder_dir: str,
    *,
    split: str,
    expand: Callable[[dict[str, Any]], list[Any]],
    decoders: Any,
    reader_index: int = 0,
    reader_count: int = 1,
    num_epochs: int | None = None,
    seed: int = 0,
    what: str = "TFDS dataset",
  ):
    super().__init__()
    if not 0 <= reader_index < reader_count:
      raise ValueError(f"{what}: reader_index {reader_index} not in [0, {reader_count})")
    builder = open_tfds_builder(builder_dir, what=what)
    self._features = builder.info.features
    self._files = tfds_shard_files(builder, builder_dir, split, what=what)
    self._expand = expand
    self._decoders = decoders
    self._reader_index = reader_index
    self._reader_count = reader_count
    self._num_epochs = num_epochs
    self._seed = seed
    self._what = what

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Called by mp_prefetch on each worker's copy: worker i of w takes readers i, i + w, ..."""
    del sequential_slice
    start, step = sl.start or 0, sl.step or 1
    self._reader_index += self._reader_count * start
    self._reader_count *= step

  def reader_plan(self) -> tuple[list[str], int, int]:
    """(this reader's shard files, record stride, record offset)."""
    if len(self._files) >= self._reader_count:
      return self._files[self._reader_index :: self._reader_count], 1, 0
    return list(self._files), self._reader_count, self._reader_index

  def parse(self, serialized: bytes) -> dict[str, Any]:
    return self._features.deserialize_example_np(serialized, decoders=self._decoders)

  def __iter__(self):
    return _ShardedTfdsIterator(self)

  def __str__(self) -> str:
    return f"ShardedTfdsIterDataset({self._what}, reader {self._reader_index}/{self._reader_count})"


class _ShardedTfdsIterator(grain.DatasetIterator):
  def __init__(self, dataset: ShardedTfdsIterDataset):
    super().__init__()
    self._dataset = dataset
    self._files, self._stride, self._offset = dataset.reader_plan()
    self._epoch = self._shard = self._record = self._item = 0
    self._records = None  # numpy iterator over the current shard, positioned at self._record
    self._items: list[Any] | None = None  # expansion of the record at self._record

  def _shard_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._dataset._seed, epoch]).permutation(len(self._files))

  def _current_path(self) -> str:
    return self._files[self._shard_order(self._epoch)[self._shard]]

  def _open_shard(self):
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(self._current_path()).skip(self._record)
    self._records = dataset.as_numpy_iterator()

  def _next_serialized(self) -> bytes:
    """The next record of the open shard; an unreadable shard is an error naming the file."""
    import tensorflow as tf

    try:
      return next(self._records)
    except tf.errors.OpError as error:
      raise OSError(
        f"{self._dataset._what}: cannot read shard {self._current_path()} at record "
        f"{self._record}: {error.message}"
      ) from None

  def __next__(self):
    while True:
      if self._items is not None and self._item < len(self._items):
        self._item += 1
        return self._items[self._item - 1]
      if self._items is not None:  # The current record is used up: move past it.
        self._items, self._item = None, 0
        self._record += 1
      if self._dataset._num_epochs is not None and self._epoch >= self._dataset._num_epochs:
        raise StopIteration
      if self._records is None:
        self._open_shard()
      try:
        serialized = self._next_serialized()
      except StopIteration:
        self._records, self._record = None, 0
        self._shard += 1
        if self._shard == len(self._files):
          self._shard, self._epoch = 0, self._epoch + 1
        continue
      if self._record % self._stride != self._offset:
        self._items = []
        continue
      try:
        self._items = list(self._dataset._expand(self._dataset.parse(serialized)))
      except Exception:  # A record that does not parse against features.json is bad input.
        self._items = [Dropped("bad_shape")]

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "shard": self._shard, "record": self._record, "item": self._item}

  def set_state(self, state: dict[str, int]) -> None:
    self._epoch, self._shard = int(state["epoch"]), int(state["shard"])
    self._record, item = int(state["record"]), int(state["item"])
    self._records, self._items, self._item = None, None, 0
    if item:
      # Re-expand the half-used record so the next item is exactly the one that was due.
      self._open_shard()
      serialized = self._next_serialized()
      try:
        self._items = list(self._dataset._expand(self._dataset.parse(serialized)))
      except Exception:
        self._items = [Dropped("bad_shape")]
      self._item = item
      if self._record % self._stride != self._offset:
        self._items = []

  def __str__(self) -> str:
    return "ShardedTfdsIterator"


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _rlds_decoders():
  import tensorflow_datasets as tfds

  # Keep the JPEGs as stored: the transforms decode only the two cameras a sample uses.
  cameras = {name: tfds.decode.SkipDecoding() for name in droid.CAMERA_NAMES}
  return {"steps": {"observation": cameras}}


class RldsEpisodeToFrames:
  """One decoded DROID episode -> its kept frames as prepared-frame dicts.

  The filters are ki.data.droid.episode_frames, the same code data_prep.droid_to_arrayrecord
  runs. Success, idle and keep-range filtering are the dataset's definition and go uncounted;
  bad input (a malformed episode, no instruction, non-finite vectors) becomes Dropped markers
  placed before the episode's frames, so the pipeline counts it.
  """

  def __init__(
    self,
    *,
    action_horizon: int,
    action_space: str = "joint_position",
    keep_ranges: dict[str, list[tuple[int, int]]] | None = None,
  ):
    self.action_horizon = action_horizon
    self.action_space = action_space
    self.keep_ranges = keep_ranges

  def __call__(self, episode: dict[str, Any]) -> list[dict[str, Any] | Dropped]:
    counts = collections.Counter()
    try:
      frames = droid.episode_frames(
        episode["episode_metadata"],
        droid.stack_steps(episode["steps"]),
        counts,
        action_space=self.action_space,
        action_horizon=self.action_horizon,
        keep_ranges_by_episode=self.keep_ranges,
      )
    except (droid.BadEpisodeError, KeyError, TypeError):
      return [Dropped("bad_shape")]
    no_instruction = (
      counts[droid.EPISODES_DROPPED_NO_INSTRUCTION] + counts[droid.FRAMES_DROPPED_NO_INSTRUCTION]
    )
    drops = [Dropped("no_instruction")] * no_instruction
    drops += [Dropped("non_finite")] * counts[droid.FRAMES_DROPPED_BAD]
    return drops + frames


def rlds_frames(
  rlds_dir: str,
  *,
  action_horizon: int,
  action_space: str = "joint_position",
  keep_ranges_path: str | None = None,
  split: str = "train",
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  seed: int = 0,
) -> ShardedTfdsIterDataset:
  """Streams DROID RLDS (local or gs://) as prepared-frame dicts, shards split across hosts."""
  keep_ranges = droid.load_keep_ranges(keep_ranges_path) if keep_ranges_path else None
  return ShardedTfdsIterDataset(
    rlds_dir,
    split=split,
    expand=RldsEpisodeToFrames(
      action_horizon=action_horizon, action_space=action_space, keep_ranges=keep_ranges
    ),
    decoders=_rlds_decoders(),
    reader_index=process_index,
    reader_count=process_count,
    num_epochs=num_epochs,
    seed=seed,
    what="RLDS dataset",
  )


# ------------------------------------------------------------------------------------------------
# VLM co-training sources.


class JsonlVlmSource(grain.sources.RandomAccessDataSource):
  """A JSONL manifest of {"image": path relative to the manifest, "prompt", "answer"} lines.

  The manifest is read and checked up front (bad JSON or a missing field names the line); image
  files are read lazily, and one that is missing or unreadable becomes Dropped("corrupt_image").
  """

  def __init__(self, manifest_path: str):
    gfile = _gfile()
    if not gfile.exists(manifest_path):
      raise FileNotFoundError(f"VLM manifest not found: {manifest_path}")
    self._root = posixpath.dirname(manifest_path)
    self._entries: list[tuple[str, str, str]] = []
    with gfile.GFile(manifest_path, "r") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          entry = json.loads(line)
          fields = (entry["image"], entry["prompt"], entry["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
          raise ValueError(
            f"VLM manifest {manifest_path} line {line_number}: expected a JSON object with "
            f"'image', 'prompt' and 'answer' ({type(error).__name__}: {error})"
          ) from error
        if not all(isinstance(value, str) for value in fields):
          raise ValueError(f"VLM manifest {manifest_path} line {line_number}: fields must be str")
        self._entries.append(fields)
    if not self._entries:
      raise ValueError(f"VLM manifest {manifest_path} has no examples")

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any] | Dropped:
    image, prompt, answer = self._entries[index]
    path = image if os.path.isabs(image) or "://" in image else posixpath.join(self._root, image)
    try:
      with _gfile().GFile(path, "rb") as f:
        data = f.read()
    except Exception:  # gfile raises NotFoundError / PermissionDeniedError / ...
      return Dropped("corrupt_image")
    return {"image": data, "prompt": prompt, "answer": answer}

  def __repr__(self) -> str:
    return f"JsonlVlmSource({len(self._entries)} examples under {self._root})"


def jsonl_vlm_examples(manifest_path: str) -> grain.MapDataset:
  return grain.MapDataset.source(JsonlVlmSource(manifest_path))


class TfdsVlmExample:
  """A decoded TFDS example -> [{"image", "prompt", "answer"}] using configured feature names."""

  def __init__(self, image_key: str, prompt_key: str, answer_key: str):
    self.image_key, self.prompt_key, self.answer_key = image_key, prompt_key, answer_key

  def __call__(self, example: dict[str, Any]) -> list[dict[str, Any]]:
    return [
      {
        "image": bytes(example[self.image_key]),
        "prompt": _text(example[self.prompt_key]),
        "answer": _text(example[self.answer_key]),
      }
    ]


def tfds_vlm_examples(
  builder_dir: str,
  *,
  split: str = "train",
  image_key: str = "image",
  prompt_key: str = "prompt",
  answer_key: str = "answer",
  process_index: int = 0,
  process_count: int = 1,
  seed: int = 0,
) -> ShardedTfdsIterDataset:
  """Streams a TFDS dataset with an image feature and two text features as VLM examples."""
  import tensorflow_datasets as tfds

  what = "VLM TFDS dataset"
  features = open_tfds_builder(builder_dir, what=what).info.features
  for key in (image_key, prompt_key, answer_key):
    if key not in features:
      raise ValueError(f"{what} {builder_dir} has no feature {key!r} (has {list(features)})")
  return ShardedTfdsIterDataset(
    builder_dir,
    split=split,
    expand=TfdsVlmExample(image_key, prompt_key, answer_key),
    decoders={image_key: tfds.decode.SkipDecoding()},
    reader_index=process_index,
    reader_count=process_count,
    seed=seed,
    what=what,
  )


def check_paths_exist(paths: Sequence[str]) -> None:
  """Raises FileNotFoundError naming the first path that does not exist."""
  gfile = _gfile()
  for path in paths:
    if not gfile.exists(path):
      raise FileNotFoundError(f"not found or unreadable: {path}")
