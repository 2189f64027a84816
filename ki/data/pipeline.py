"""The host data pipeline: sources -> per-example transforms -> mixture -> batches, in Grain.

One entry point, `make_iterator`, builds this for one host (process):

  robot frames (ArrayRecord: MapDataset with a global shuffle, then this host's slice, repeat;
                or RLDS: IterDataset over this host's shards, then a window shuffle)
    -> RobotTransform (random_map: randomness seeded by (seed, element index))
    -> drop counting (Dropped markers become a per-example count vector on the next kept example)
  [+ VLM sources (JSONL / TFDS), each -> VlmTransform -> drop counting]
    -> IterDataset.mix(weights)
    -> batch(per_host_batch_size, drop_remainder=True)
    -> mp_prefetch(num_workers)   (0 = in-process)
    -> HostBatchIterator: strips the counts off each batch and keeps running totals.

Why drop counts travel inside the examples: with worker processes, a counter in a transform
object would be incremented in a worker's copy and never seen by the trainer. Carrying the counts
through the batch makes them exact whatever the number of workers, and putting the totals in the
iterator state makes them survive a restore.

The iterator is a grain DatasetIterator, so its state goes into the checkpoint with Grain's orbax
handler (`checkpoint_handler`, `checkpoint_save_args`, `checkpoint_restore_args`).
"""

from collections.abc import Mapping
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from ki.data import droid, sources, transforms
from ki.data.transforms import DROP_REASONS, Dropped

SOURCE_KINDS = ("arrayrecord", "rlds")
VLM_KINDS = ("jsonl", "tfds")
SPLITS = ("train", "eval")
DROP_COUNTS_KEY = "drop_counts"
_SEED_MODULUS = 2**32


def default_config() -> ml_collections.ConfigDict:
  """Every field `make_iterator` reads, with its default.

  Robot source:
    source: "arrayrecord" (prepared shards, data_prep.droid_to_arrayrecord) or "rlds" (stream
      DROID's TFDS folder directly).
    arrayrecord_dir: folder (or glob) of the training shards; eval_arrayrecord_dir: of the eval
      shards (needed only for split="eval").
    rlds_dir: the TFDS version folder (local or gs://); rlds_split / rlds_eval_split: its splits.
    keep_ranges_path: openpi's keep-ranges JSON for the RLDS stream ('' = compute the idle rule).
    action_space: "joint_position" or "joint_velocity" (RLDS stream; prepared data fixed it).
    shuffle_window: RLDS stream window-shuffle size in frames (memory: ~45 KB per frame).
  Example layout:
    action_dim: the model's action width (state and actions are zero-padded to it).
    action_horizon: H; data_action_dim: real dims (8 for DROID).
    delta_action_mask: per real dim, joints relative to the state; () keeps absolute actions.
    augment: pi0.5's image augmentation (only when train=True).
    image_size: 224.
  Execution:
    num_workers: Grain worker processes (0 = in-process); worker_buffer_size: batches each
      worker prefetches; read_threads / read_buffer_size: grain.ReadOptions for the in-process
      element reads; num_epochs: 0 repeats forever (train) — eval always reads one epoch.
  Co-training mixture (train only):
    robot_weight: the robot source's weight; 0 trains on the VLM sources alone (the pretrained-VLM
      stage, experiments/vlm_pretrain.py). Eval always reads the robot split.
    vlm_sources: a tuple of dicts {"kind": "jsonl"|"tfds", "path": manifest file or TFDS folder,
      "weight": float, "split": TFDS split ("train"), "image_key": "image",
      "prompt_key": "prompt", "answer_key": "answer"}.
  """
  config = ml_collections.ConfigDict()
  config.source = "arrayrecord"
  config.arrayrecord_dir = ""
  config.eval_arrayrecord_dir = ""
  config.rlds_dir = ""
  config.rlds_split = "train"
  config.rlds_eval_split = "train"
  config.keep_ranges_path = ""
  config.action_space = "joint_position"
  config.shuffle_window = 4096
  config.action_dim = 32
  config.action_horizon = 16
  config.data_action_dim = droid.ACTION_DIM
  config.delta_action_mask = droid.DEFAULT_DELTA_ACTION_MASK
  config.augment = True
  config.image_size = 224
  config.num_workers = 0
  config.worker_buffer_size = 2
  config.read_threads = 2
  config.read_buffer_size = 64
  config.num_epochs = 0
  config.robot_weight = 1.0
  config.vlm_sources = ()
  # Locked: a misspelt field in an experiment file fails where it is written.
  config.lock()
  return config


def _vlm_entry(entry: Mapping[str, Any], position: int) -> dict[str, Any]:
  entry = dict(entry)
  defaults = {
    "split": "train",
    "image_key": "image",
    "prompt_key": "prompt",
    "answer_key": "answer",
  }
  unknown = set(entry) - set(defaults) - {"kind", "path", "weight"}
  if unknown:
    raise ValueError(f"data.vlm_sources[{position}]: unknown fields {sorted(unknown)}")
  for field in ("kind", "path", "weight"):
    if field not in entry:
      raise ValueError(f"data.vlm_sources[{position}]: missing {field!r}")
  if entry["kind"] not in VLM_KINDS:
    raise ValueError(f"data.vlm_sources[{position}].kind={entry['kind']!r}, expected {VLM_KINDS}")
  if not float(entry["weight"]) > 0:
    raise ValueError(f"data.vlm_sources[{position}].weight must be > 0, got {entry['weight']}")
  return {**defaults, **entry}


def validate_config(
  config: ml_collections.ConfigDict,
  *,
  split: str,
  process_index: int,
  process_count: int,
  per_host_batch_size: int,
) -> list[dict[str, Any]]:
  """Checks the data config before anything runs; returns the parsed VLM source entries.

  Raises:
    ValueError / FileNotFoundError naming the field, folder or file that is wrong.
  """
  unknown = set(config.keys()) - set(default_config().keys())
  if unknown:
    raise ValueError(f"data config has unknown fields {sorted(unknown)}")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if per_host_batch_size <= 0:
    raise ValueError(f"per_host_batch_size must be positive, got {per_host_batch_size}")
  if config.source not in SOURCE_KINDS:
    raise ValueError(f"data.source={config.source!r}, expected one of {SOURCE_KINDS}")
  if config.action_space not in droid.ACTION_SPACES:
    raise ValueError(f"data.action_space={config.action_space!r}, expected {droid.ACTION_SPACES}")
  if config.data_action_dim > config.action_dim:
    raise ValueError(
      f"data.data_action_dim={config.data_action_dim} > data.action_dim={config.action_dim}"
    )
  if config.delta_action_mask and len(config.delta_action_mask) != config.data_action_dim:
    raise ValueError(
      f"data.delta_action_mask has {len(config.delta_action_mask)} entries, expected "
      f"data.data_action_dim={config.data_action_dim}"
    )
  for field in ("action_horizon", "image_size", "shuffle_window", "worker_buffer_size"):
    if config[field] <= 0:
      raise ValueError(f"data.{field} must be positive, got {config[field]}")
  for field in ("num_workers", "read_threads", "read_buffer_size", "num_epochs"):
    if config[field] < 0:
      raise ValueError(f"data.{field} must be >= 0, got {config[field]}")
  if config.source == "arrayrecord":
    field = "arrayrecord_dir" if split == "train" else "eval_arrayrecord_dir"
    if not config[field]:
      raise ValueError(f"data.{field} is empty: the {split} split needs prepared shards")
    sources.find_arrayrecord_files(config[field])
  else:
    sources.open_tfds_builder(config.rlds_dir, what="data.rlds_dir")
  if config.keep_ranges_path:
    sources.check_paths_exist([config.keep_ranges_path])
  entries = [_vlm_entry(entry, i) for i, entry in enumerate(config.vlm_sources)]
  if config.robot_weight < 0 or (config.robot_weight == 0 and not entries):
    raise ValueError(
      f"data.robot_weight must be > 0 (or 0 with data.vlm_sources set, to train on "
      f"the VLM sources alone), got {config.robot_weight}"
    )
  for i, entry in enumerate(entries):
    if entry["kind"] == "jsonl":
      sources.check_paths_exist([entry["path"]])
    else:
      sources.open_tfds_builder(entry["path"], what=f"data.vlm_sources[{i}].path")
  return entries


def _seed(seed: int, stream: int) -> int:
  """A distinct seed per random stream (shuffle, transforms, each VLM source...)."""
  return int(np.random.default_rng([seed, stream]).integers(_SEED_MODULUS))


def _map_pipeline(
  dataset: grain.MapDataset,
  transform,
  *,
  seed: int,
  process_index: int,
  process_count: int,
  num_epochs: int | None,
  shuffle: bool,
  read_options: grain.ReadOptions,
) -> grain.IterDataset:
  """Global shuffle -> this host's slice -> repeat -> per-index random transform -> iterator."""
  if shuffle:
    dataset = dataset.shuffle(seed=_seed(seed, 0))
  # Every host shuffles with the same seed, so strided slices of one permutation are disjoint.
  dataset = dataset[process_index::process_count]
  if len(dataset) == 0:
    raise ValueError(f"host {process_index} of {process_count} gets no examples from {dataset}")
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.random_map(transform, seed=_seed(seed, 1))
  return dataset.to_iter_dataset(read_options)


class _DropCountingIterDataset(grain.IterDataset):
  """Skips Dropped markers and attaches their counts (int32 [len(DROP_REASONS)]) to the next
  kept example under DROP_COUNTS_KEY, so batching sums them without losing any."""

  def __iter__(self):
    return _DropCountingIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "DropCountingIterDataset"


class _DropCountingIterator(grain.DatasetIterator):
  def __next__(self):
    counts = np.zeros(len(DROP_REASONS), np.int32)
    while True:
      # Counts of drops just before the end of a finite iterator have no example to ride on;
      # they are lost with the StopIteration (eval only: training repeats forever).
      element = next(self._parent)
      if isinstance(element, Dropped):
        counts[DROP_REASONS.index(element.reason)] += 1
        continue
      return {**element, DROP_COUNTS_KEY: counts}

  def get_state(self):
    # A state is only ever taken between __next__ calls, when no counts are pending.
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class HostBatchIterator(grain.DatasetIterator):
  """Yields host-batch dicts; `drop_counts` holds the running totals of skipped examples.

  Its state is {"pipeline": Grain's state, "drop_totals": {...}}; restore it with `set_state` or
  through orbax (`checkpoint_restore_args`).
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._totals = np.zeros(len(DROP_REASONS), np.int64)

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self._parent))
    self._totals += np.asarray(batch.pop(DROP_COUNTS_KEY)).sum(axis=0)
    return batch

  @property
  def drop_counts(self) -> dict[str, int]:
    """Examples skipped by this host since the start of training (sum over its workers; the
    trainer sums over hosts if it wants global counts)."""
    return {reason: int(count) for reason, count in zip(DROP_REASONS, self._totals)}

  def metrics(self) -> dict[str, int]:
    """The drop counts named for the metrics writer: {"data/dropped/<reason>": total}."""
    return {f"data/dropped/{reason}": count for reason, count in self.drop_counts.items()}

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "drop_totals": self.drop_counts}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._totals = np.array([state["drop_totals"].get(r, 0) for r in DROP_REASONS], np.int64)

  def close(self) -> None:
    self._parent.close()


class _HostBatchIterDataset(grain.IterDataset):
  def __iter__(self) -> HostBatchIterator:
    return HostBatchIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "HostBatchIterDataset"


def _robot_dataset(
  config: ml_collections.ConfigDict,
  transform: transforms.RobotTransform,
  *,
  split: str,
  seed: int,
  process_index: int,
  process_count: int,
  num_epochs: int | None,
  train: bool,
  read_options: grain.ReadOptions,
) -> grain.IterDataset:
  """Robot frames through RobotTransform: the ArrayRecord MapDataset path or the RLDS stream."""
  if config.source == "arrayrecord":
    path = config.arrayrecord_dir if split == "train" else config.eval_arrayrecord_dir
    return _map_pipeline(
      sources.arrayrecord_frames(path),
      transform,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
      shuffle=train,
      read_options=read_options,
    )
  frames = sources.rlds_frames(
    config.rlds_dir,
    action_horizon=config.action_horizon,
    action_space=config.action_space,
    keep_ranges_path=config.keep_ranges_path or None,
    split=config.rlds_split if split == "train" else config.rlds_eval_split,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
    seed=_seed(seed, 2),
  )
  if train:
    frames = grain.experimental.WindowShuffleIterDataset(
      frames, window_size=config.shuffle_window, seed=_seed(seed, 3)
    )
  return frames.random_map(transform, seed=_seed(seed, 1))


def _vlm_dataset(
  entry: dict[str, Any],
  transform: transforms.VlmTransform,
  *,
  seed: int,
  process_index: int,
  process_count: int,
  read_options: grain.ReadOptions,
) -> grain.IterDataset:
  """One co-training source through VlmTransform, repeating forever."""
  if entry["kind"] == "jsonl":
    return _map_pipeline(
      sources.jsonl_vlm_examples(entry["path"]),
      transform,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_epochs=None,
      shuffle=True,
      read_options=read_options,
    )
  examples = sources.tfds_vlm_examples(
    entry["path"],
    split=entry["split"],
    image_key=entry["image_key"],
    prompt_key=entry["prompt_key"],
    answer_key=entry["answer_key"],
    process_index=process_index,
    process_count=process_count,
    seed=_seed(seed, 2),
  )
  return examples.random_map(transform, seed=_seed(seed, 1))


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read Grain's absl flags, which raise when unparsed. Under
  ki.main (an absl app) they are parsed; in pytest, notebooks and scripts take the defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_iterator(
  config: ml_collections.ConfigDict,
  *,
  tokenizer,
  norm_stats: Mapping[str, Any],
  split: str,
  seed: int,
  process_index: int,
  process_count: int,
  per_host_batch_size: int,
  train: bool,
) -> HostBatchIterator:
  """Builds this host's iterator of host batches (see the module docstring for the stages).

  Args:
    config: the data config (fields and defaults: `default_config`).
    tokenizer: ki.tokenizers.prompt.Pi05Tokenizer (with a FAST tokenizer for KI training).
    norm_stats: {"state": NormStats, "actions": NormStats} (ki.data.normalize.load_norm_stats).
    split: "train" or "eval" (which shards / RLDS split).
    seed: the data seed; the same on every host (hosts differ by process_index).
    process_index, process_count: this host and the number of hosts (jax.process_index/count).
    per_host_batch_size: examples per batch on this host (global batch / process_count).
    train: shuffle, augment, repeat forever (num_epochs=0) and mix in VLM sources; eval reads
      the robot split once, in order, without augmentation.

  Returns:
    A HostBatchIterator yielding the host-batch dicts of the data contract, each array with a
    leading [per_host_batch_size] axis.
  """
  vlm_entries = validate_config(
    config,
    split=split,
    process_index=process_index,
    process_count=process_count,
    per_host_batch_size=per_host_batch_size,
  )
  missing_stats = {"state", "actions"} - set(norm_stats)
  if missing_stats:
    raise ValueError(f"norm_stats lack {sorted(missing_stats)}")
  num_epochs = (config.num_epochs or None) if train else 1
  read_options = grain.ReadOptions(
    num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size
  )
  augment = bool(config.augment and train)
  robot = _robot_dataset(
    config,
    transforms.RobotTransform(
      tokenizer=tokenizer,
      norm_stats=dict(norm_stats),
      action_dim=config.action_dim,
      action_horizon=config.action_horizon,
      data_action_dim=config.data_action_dim,
      delta_action_mask=tuple(config.delta_action_mask) or None,
      augment=augment,
      # The FAST postfix (KI, pi0-FAST) only when the tokenizer can make one: flow-only runs
      # build their tokenizer without FAST and so train on prompts without it.
      include_actions_in_prompt=tokenizer.fast_tokenizer is not None,
      image_size=config.image_size,
    ),
    split=split,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
    train=train,
    read_options=read_options,
  )
  # Drops are taken out (and counted) per source, before mixing, so the mixture weights hold
  # for the examples that reach the batch.
  dataset = robot = _DropCountingIterDataset(robot)
  if train and vlm_entries:
    vlm_transform = transforms.VlmTransform(
      tokenizer=tokenizer,
      action_dim=config.action_dim,
      action_horizon=config.action_horizon,
      augment=augment,
      image_size=config.image_size,
    )
    datasets = [robot] + [
      _DropCountingIterDataset(
        _vlm_dataset(
          entry,
          vlm_transform,
          seed=_seed(seed, 100 + i),
          process_index=process_index,
          process_count=process_count,
          read_options=read_options,
        )
      )
      for i, entry in enumerate(vlm_entries)
    ]
    weights = [float(config.robot_weight)] + [float(entry["weight"]) for entry in vlm_entries]
    if weights[0] == 0:  # VLM sources alone: grain's mix needs positive weights
      datasets, weights = datasets[1:], weights[1:]
    dataset = grain.IterDataset.mix(datasets, weights)
  dataset = dataset.batch(per_host_batch_size, drop_remainder=True)
  if config.num_workers > 0:
    _ensure_absl_flags_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
      )
    )
  return iter(_HostBatchIterDataset(dataset))


# ------------------------------------------------------------------------------------------------
# Checkpointing with orbax, through Grain's handler.


def checkpoint_handler() -> grain.checkpoint.CheckpointHandler:
  """The orbax item handler for the data iterator: one JSON file per process in the step folder.

  Register it with orbax's CheckpointManager, e.g.
    ocp.CheckpointManager(dir, item_handlers={..., "data": checkpoint_handler()})
  (ki/train/checkpoint.py does the same with grain's classes directly.)
  """
  return grain.checkpoint.CheckpointHandler()


def checkpoint_save_args(iterator: HostBatchIterator) -> grain.checkpoint.CheckpointSave:
  """`args` for the data item in `manager.save(step, args=ocp.args.Composite(...))`."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: HostBatchIterator) -> grain.checkpoint.CheckpointRestore:
  """`args` for the data item in `manager.restore(step, args=...)`: restores `iterator` in place
  (build a fresh one with make_iterator and the same arguments first)."""
  return grain.checkpoint.CheckpointRestore(iterator)
