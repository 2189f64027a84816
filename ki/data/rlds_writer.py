"""Writes episodes as a TFDS RLDS dataset with exactly DROID's feature spec.

`droid_features()` is DROID's `features.json` in code (names, shapes, dtypes, JPEG images; see
shared/reference/droid_rlds.md); `write_rlds_dataset` runs TFDS's own builder machinery over an
episode factory, producing what `tfds.builder_from_directory` opens: dataset_info.json,
features.json and `droid-train.tfrecord-NNNNN-of-MMMMM` shards. The builder lives in this module
(not in a `__main__`) so that dataset_info.json names the same module however it was launched, and
a rerun with the same inputs writes the same bytes.
"""

from collections.abc import Callable, Mapping
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ki.data import droid

DATASET_NAME = "droid"
DATASET_VERSION = "1.0.1"


def droid_features() -> tfds.features.FeaturesDict:
  """DROID's RLDS feature spec."""

  def vector(size: int) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(size,), dtype=np.float64)

  image = tfds.features.Image(shape=droid.IMAGE_SHAPE, dtype=np.uint8, encoding_format="jpeg")
  return tfds.features.FeaturesDict(
    {
      "episode_metadata": tfds.features.FeaturesDict(
        {
          "file_path": tfds.features.Text(),
          "recording_folderpath": tfds.features.Text(),
        }
      ),
      "steps": tfds.features.Dataset(
        {
          "is_first": tfds.features.Scalar(dtype=np.bool_),
          "is_last": tfds.features.Scalar(dtype=np.bool_),
          "is_terminal": tfds.features.Scalar(dtype=np.bool_),
          "language_instruction": tfds.features.Text(),
          "language_instruction_2": tfds.features.Text(),
          "language_instruction_3": tfds.features.Text(),
          "observation": tfds.features.FeaturesDict(
            {
              "exterior_image_1_left": image,
              "exterior_image_2_left": image,
              "wrist_image_left": image,
              "cartesian_position": vector(6),
              "joint_position": vector(droid.NUM_JOINTS),
              "gripper_position": vector(1),
            }
          ),
          "action_dict": tfds.features.FeaturesDict(
            {
              "cartesian_position": vector(6),
              "cartesian_velocity": vector(6),
              "joint_position": vector(droid.NUM_JOINTS),
              "joint_velocity": vector(droid.NUM_JOINTS),
              "gripper_position": vector(1),
              "gripper_velocity": vector(1),
            }
          ),
          "action": vector(7),
          "discount": tfds.features.Scalar(dtype=np.float32),
          "reward": tfds.features.Scalar(dtype=np.float32),
        }
      ),
    }
  )


EpisodeFactory = Callable[[int], Mapping[str, Any]]


class Droid(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Episodes in DROID's RLDS format, produced by an episode factory (index -> episode dict)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "DROID's feature spec; episodes from ki's data_prep."}
  # TFDS looks for a checksums file beside the builder's module through `importlib_resources`,
  # which tfds 4.9 declares only for Python < 3.9 yet imports on every Python. Nothing is
  # downloaded here, so there is no checksums file to find: skip the search.
  code_path = None

  def __init__(self, *, make_episode: EpisodeFactory, num_episodes: int, description: str, **kw):
    self._make_episode = make_episode
    self._num_episodes = num_episodes
    self._description = description
    super().__init__(**kw)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=self._description,
      features=droid_features(),
      homepage="https://droid-dataset.github.io/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index in range(self._num_episodes):
      yield index, self._make_episode(index)


def write_rlds_dataset(
  data_dir: str,
  make_episode: EpisodeFactory,
  num_episodes: int,
  *,
  num_shards: int,
  description: str,
) -> str:
  """Builds the dataset under `data_dir/droid/1.0.1` and returns that version folder.

  Args:
    data_dir: parent folder (TFDS's data_dir).
    make_episode: index -> {"episode_metadata": {...}, "steps": [step dict, ...]} with numpy
      images (TFDS encodes them as JPEG) and float64 vectors.
    num_episodes: how many episodes to write.
    num_shards: number of TFRecord shards (TFDS spreads episodes over them).
    description: goes into dataset_info.json.
  """
  if num_episodes < 1 or num_shards < 1:
    raise ValueError(f"need >= 1 episode and shard, got {num_episodes} and {num_shards}")
  builder = Droid(
    make_episode=make_episode,
    num_episodes=num_episodes,
    description=description,
    data_dir=data_dir,
  )
  if os.path.exists(builder.data_dir):
    raise FileExistsError(f"dataset already exists, remove it first: {builder.data_dir}")
  # TFDS wants a download folder even when nothing is downloaded; keep it out of data_dir.
  download_dir = tempfile.mkdtemp(prefix="ki_rlds_downloads_")
  try:
    builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(num_shards=num_shards, try_download_gcs=False),
    )
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)
  for path in builder.info.splits["train"].filepaths:
    _serialize_deterministically(os.fspath(path))
  return builder.data_dir


def _serialize_deterministically(shard_path: str) -> None:
  """Rewrites a TFRecord shard with each tf.train.Example's feature map in sorted key order.

  Protobuf map fields serialize in an unspecified order that changes from process to process, so
  TFDS's shards differ byte-wise between identical runs; the parsed examples are the same.
  """
  import tensorflow as tf  # TFDS depends on TF already; imported here to keep the module light.

  records = [record.numpy() for record in tf.data.TFRecordDataset(shard_path)]
  temporary = shard_path + ".sorted"
  with tf.io.TFRecordWriter(temporary) as writer:
    for record in records:
      writer.write(tf.train.Example.FromString(record).SerializeToString(deterministic=True))
  os.replace(temporary, shard_path)
