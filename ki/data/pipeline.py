"""The host data pipeline: sources -> per-example transforms -> mixture -> batches, in Grain.

`make_streams` is what the trainer calls: the training iterator and the eval sets of one host.
`make_iterator` builds one stream for one host (process):

  robot frames (ArrayRecord: MapDataset with a global shuffle, then this host's slice, repeat;
                or RLDS: IterDataset over this host's shards, then a window shuffle)
    -> RobotTransform (random_map: randomness seeded by (seed, element index)) -> a ki.batch.Batch
       per example (no batch axis)
    -> drop counting (Dropped markers become a count vector riding with the next kept example)
  [+ VLM sources (JSONL / TFDS), each -> VlmTransform -> drop counting]
    -> IterDataset.mix(weights)
    -> batch(per_host_batch_size, drop_remainder=True)
    -> mp_prefetch(num_workers)   (0 = in-process)
    -> HostBatchIterator: strips the counts off each batch, keeps running totals and yields
       ki.batch.Batch objects with a leading [per_host_batch_size] axis.

Shapes (action_dim, action_horizon, data_action_dim, image_size, cameras) come from the model
config (pi05.Config, duck-typed: this module does not import the model); the data config holds
only how to read and mix the data.

Why drop counts travel inside the examples: with worker processes, a counter in a transform
object would be incremented in a worker's copy and never seen by the trainer. Carrying the counts
through the batch makes them exact whatever the number of workers, and putting the totals in the
iterator state makes them survive a restore.

The iterator is a grain DatasetIterator, so its state goes into the checkpoint with Grain's orbax
handler (grain.checkpoint.CheckpointHandler / CheckpointSave / CheckpointRestore).
"""

from collections.abc import Callable, Iterable, Mapping
import dataclasses
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from ki.batch import Batch
from ki.data import droid, lerobot, robot_spec, sources, transforms
from ki.data.transforms import DROP_REASONS, Dropped

SOURCE_KINDS = ("arrayrecord", "rlds", "lerobot")
VLM_KINDS = ("jsonl", "tfds")
SPLITS = ("train", "eval")
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
    lerobot_dir: a local LeRobot dataset folder (v2.1 or v3.0, source="lerobot");
      lerobot_eval_episodes: its last N episodes are the eval split (0 = none); robot: the robot
      spec mapping its keys to the model (ki/data/robot_spec.py).
    shuffle_window: RLDS stream window-shuffle size in frames (memory: ~45 KB per frame).
    skip_unreadable_records: an ArrayRecord record that cannot be read (a shard corrupted,
      truncated or deleted while training runs) is skipped and counted as
      data/dropped/unreadable_record instead of stopping training with an error naming the shard.
  Examples (their shapes come from the model config):
    delta_action_mask: per real dim (model.data_action_dim of them), joints relative to the
      state; () keeps absolute actions.
    augment: pi0.5's image augmentation (only when train=True).
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
  config.lerobot_dir = ""
  config.lerobot_eval_episodes = 0
  config.robot = robot_spec.default_config()
  config.shuffle_window = 4096
  config.delta_action_mask = droid.DEFAULT_DELTA_ACTION_MASK
  config.augment = True
  config.num_workers = 0
  config.worker_buffer_size = 2
  config.read_threads = 2
  config.read_buffer_size = 64
  config.num_epochs = 0
  config.robot_weight = 1.0
  config.vlm_sources = ()
  config.skip_unreadable_records = False
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
  model_config,
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
  if config.delta_action_mask and len(config.delta_action_mask) != model_config.data_action_dim:
    raise ValueError(
      f"data.delta_action_mask has {len(config.delta_action_mask)} entries, expected "
      f"model.data_action_dim={model_config.data_action_dim}"
    )
  for field in ("shuffle_window", "worker_buffer_size"):
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
  elif config.source == "lerobot":
    if not config.lerobot_dir:
      raise ValueError("data.lerobot_dir is empty: source='lerobot' needs a dataset folder")
    dataset = lerobot.open_dataset(config.lerobot_dir)
    robot_spec.validate(
      config.robot, dataset, model_config, delta_action_mask=config.delta_action_mask
    )
    lerobot.split_episodes(
      len(dataset.episodes),
      split=split,
      eval_episodes=config.lerobot_eval_episodes,
      process_index=process_index,
      process_count=process_count,
    )
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
  """Skips Dropped markers and pairs the next kept example with their counts:
  (Batch, int32 [len(DROP_REASONS)]). Batching stacks the counts, HostBatchIterator sums them, so
  none is lost whichever worker process saw the drop."""

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
      return element, counts

  def get_state(self):
    # A state is only ever taken between __next__ calls, when no counts are pending.
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class HostBatchIterator(grain.DatasetIterator):
  """Yields ki.batch.Batch host batches; `drop_counts` holds the running totals of skipped
  examples.

  Its state is {"pipeline": Grain's state, "drop_totals": {...}}; restore it with `set_state` or
  through orbax (grain.checkpoint.CheckpointRestore).
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._totals = np.zeros(len(DROP_REASONS), np.int64)

  def __next__(self) -> Batch:
    batch, counts = next(self._parent)
    self._totals += np.asarray(counts).sum(axis=0)
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
  model_config,
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
      sources.arrayrecord_frames(path, skip_unreadable=config.skip_unreadable_records),
      transform,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_epochs=num_epochs,
      shuffle=train,
      read_options=read_options,
    )
  if config.source == "lerobot":
    dataset = lerobot.open_dataset(config.lerobot_dir)
    frames = lerobot.LeRobotFrames(
      dataset,
      cameras=tuple(key for key, _ in config.robot.cameras),
      state_key=config.robot.state_key,
      action_key=config.robot.action_key,
      action_horizon=model_config.action_horizon,
      # Whole episodes per host: each host decodes only its own videos.
      episodes=lerobot.split_episodes(
        len(dataset.episodes),
        split=split,
        eval_episodes=config.lerobot_eval_episodes,
        process_index=process_index,
        process_count=process_count,
      ),
    )
    return _map_pipeline(
      grain.MapDataset.source(frames),
      transform,
      seed=seed,
      process_index=0,  # already this host's episodes
      process_count=1,
      num_epochs=num_epochs,
      shuffle=train,
      read_options=read_options,
    )
  frames = sources.rlds_frames(
    config.rlds_dir,
    action_horizon=model_config.action_horizon,
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


def _robot_transform(model_config, tokenizer, norm_stats, delta_action_mask, augment: bool):
  return transforms.RobotTransform(
    tokenizer=tokenizer,
    norm_stats=dict(norm_stats),
    action_dim=model_config.action_dim,
    action_horizon=model_config.action_horizon,
    data_action_dim=model_config.data_action_dim,
    image_keys=tuple(model_config.image_keys),
    delta_action_mask=tuple(delta_action_mask) or None,
    augment=augment,
    # The FAST postfix (KI, pi0-FAST) only when the tokenizer can make one: flow-only runs
    # build their tokenizer without FAST and so train on prompts without it.
    include_actions_in_prompt=tokenizer.fast_tokenizer is not None,
    image_size=model_config.image_size,
  )


def _lerobot_transform(config, model_config, tokenizer, norm_stats, augment: bool):
  return robot_spec.LeRobotTransform(
    tokenizer=tokenizer,
    norm_stats=dict(norm_stats),
    cameras=tuple((key, slot) for key, slot in config.robot.cameras),
    action_dim=model_config.action_dim,
    action_horizon=model_config.action_horizon,
    data_action_dim=model_config.data_action_dim,
    image_keys=tuple(model_config.image_keys),
    delta_action_mask=tuple(config.delta_action_mask) or None,
    augment=augment,
    include_actions_in_prompt=tokenizer.fast_tokenizer is not None,
    image_size=model_config.image_size,
  )


def _vlm_transform(model_config, tokenizer, augment: bool):
  return transforms.VlmTransform(
    tokenizer=tokenizer,
    action_dim=model_config.action_dim,
    action_horizon=model_config.action_horizon,
    image_keys=tuple(model_config.image_keys),
    augment=augment,
    image_size=model_config.image_size,
  )


def make_iterator(
  config: ml_collections.ConfigDict,
  model_config,
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
    model_config: the pi05.Config the batches are for (action_dim, action_horizon,
      data_action_dim, image_size, image_keys are read from it).
    tokenizer: ki.tokenizers.prompt.Pi05Tokenizer (with a FAST tokenizer for KI training).
    norm_stats: {"state": NormStats, "actions": NormStats} (ki.data.normalize.load_norm_stats).
    split: "train" or "eval" (which shards / RLDS split).
    seed: the data seed; the same on every host (hosts differ by process_index).
    process_index, process_count: this host and the number of hosts (jax.process_index/count).
    per_host_batch_size: examples per batch on this host (global batch / process_count).
    train: shuffle, augment, repeat forever (num_epochs=0) and mix in VLM sources; eval reads
      the robot split once, in order, without augmentation.

  Returns:
    A HostBatchIterator yielding ki.batch.Batch objects, each array with a leading
    [per_host_batch_size] axis.
  """
  vlm_entries = validate_config(
    config,
    model_config,
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
  if config.source == "lerobot":
    transform = _lerobot_transform(config, model_config, tokenizer, norm_stats, augment)
  else:
    transform = _robot_transform(
      model_config, tokenizer, norm_stats, config.delta_action_mask, augment
    )
  robot = _robot_dataset(
    config,
    model_config,
    transform,
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
    vlm_transform = _vlm_transform(model_config, tokenizer, augment)
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


def vlm_heldout_batches(
  manifest_path: str,
  model_config,
  *,
  tokenizer,
  per_host_batch_size: int,
  process_index: int,
  process_count: int,
) -> Iterable[Batch]:
  """Held-out co-training (VLM) host batches from a JSONL manifest, read once in order.

  The same record source and example transform as the training mixture, without augmentation;
  examples the transform drops are skipped (not counted: this is an eval set).
  """
  dataset = sources.jsonl_vlm_examples(manifest_path)[process_index::process_count]
  dataset = dataset.random_map(_vlm_transform(model_config, tokenizer, augment=False), seed=0)
  dataset = dataset.filter(lambda example: not isinstance(example, Dropped))
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1))
  return iter(dataset.batch(per_host_batch_size, drop_remainder=True))


@dataclasses.dataclass(frozen=True)
class Streams:
  """One host's data for a training run.

  train: the training iterator (its state goes into the checkpoint).
  eval_sets: {name: zero-argument callable returning a fresh iterable of Batch}; "robot" (the
    eval shards) and "vlm" (held-out co-training examples), each only when configured.
  """

  train: HostBatchIterator
  eval_sets: dict[str, Callable[[], Iterable[Batch]]]


def make_streams(
  config: ml_collections.ConfigDict,
  model_config,
  tokenizer,
  norm_stats: Mapping[str, Any],
  *,
  process_index: int,
  process_count: int,
) -> Streams:
  """The training iterator and the eval sets of one host, from the experiment config.

  Reads config.data (the data config), config.seed, config.batch_size (global; each host reads
  batch_size / process_count) and config.eval.{every, batch_size, vlm_heldout}. The eval sets
  exist only when config.eval.every is set: "robot" when data.eval_arrayrecord_dir is, "vlm"
  when eval.vlm_heldout is.

  Args:
    config: the experiment config (ki.train.config.default_config's fields).
    model_config: the validated pi05.Config; the batches' shapes come from it.
    tokenizer: ki.tokenizers.prompt.Pi05Tokenizer (with a FAST tokenizer iff the model's fast_loss).
    norm_stats: {"state": NormStats, "actions": NormStats}.
    process_index, process_count: this host and the number of hosts.
  """
  for name, size in (
    ("batch_size", config.batch_size),
    ("eval.batch_size", config.eval.batch_size),
  ):
    if size % process_count:
      raise ValueError(f"config.{name}={size} is not divisible by {process_count} hosts")
  common = dict(
    tokenizer=tokenizer,
    norm_stats=norm_stats,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
  )
  train = make_iterator(
    config.data,
    model_config,
    split="train",
    train=True,
    per_host_batch_size=config.batch_size // process_count,
    **common,
  )
  eval_sets = {}
  eval_batch_size = config.eval.batch_size // process_count
  robot_eval = (
    config.data.lerobot_eval_episodes
    if config.data.source == "lerobot"
    else config.data.eval_arrayrecord_dir
  )
  if config.eval.every and robot_eval:
    eval_sets["robot"] = lambda: make_iterator(
      config.data,
      model_config,
      split="eval",
      train=False,
      per_host_batch_size=eval_batch_size,
      **common,
    )
  if config.eval.every and config.eval.get("vlm_heldout"):
    eval_sets["vlm"] = lambda: vlm_heldout_batches(
      config.eval.vlm_heldout,
      model_config,
      tokenizer=tokenizer,
      per_host_batch_size=eval_batch_size,
      process_index=process_index,
      process_count=process_count,
    )
  return Streams(train=train, eval_sets=eval_sets)
