"""The RLDS streaming reader on synthetic DROID (data_prep's writer, DROID's exact feature spec):
frames match the filters and the record contract, hosts get disjoint shards, the stream and the
full streaming pipeline resume exactly, and missing/unreadable shards are errors naming them."""

import os
import shutil

import jax
import numpy as np
import pytest

from ki.data import droid, pipeline, records, rlds_writer, sources, synthetic_droid
from ki.data.transforms import Dropped
from tests.data import pipeline_fixtures as fixtures

NUM_EPISODES = 6


@pytest.fixture(scope="module")
def rlds_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("rlds"))
  return rlds_writer.write_rlds_dataset(
    root,
    lambda index: synthetic_droid.make_episode(0, index),
    NUM_EPISODES,
    num_shards=3,
    description="ki data tests",
  )


def stream(rlds_dir, **kwargs):
  return sources.rlds_frames(rlds_dir, action_horizon=fixtures.HORIZON, **kwargs)


def key(element):
  """(episode id, step) of a frame; a Dropped marker stands for itself."""
  return element if isinstance(element, Dropped) else (element["episode_id"], element["step"])


def frames_of(elements):
  return [e for e in elements if not isinstance(e, Dropped)]


def episodes(rlds_dir):
  """Every episode of the dataset, decoded (with all steps stacked), keyed by episode id."""
  import tensorflow as tf

  reader = stream(rlds_dir)
  result = {}
  for path in reader.reader_plan()[0]:
    for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
      episode = reader.parse(serialized)
      metadata = episode["episode_metadata"]
      key = droid.episode_key(
        metadata["recording_folderpath"].decode(), metadata["file_path"].decode()
      )
      result[key] = droid.stack_steps(episode["steps"])
  return result


def test_stream_keeps_successful_non_idle_frames_as_prepared_records(rlds_dir):
  elements = list(stream(rlds_dir, num_epochs=1))
  frames = [e for e in elements if not isinstance(e, Dropped)]
  dropped = [e for e in elements if isinstance(e, Dropped)]
  all_episodes = episodes(rlds_dir)
  assert len(all_episodes) == NUM_EPISODES
  by_episode = {}
  for frame in frames:
    records.validate_frame(frame, action_horizon=fixtures.HORIZON)
    by_episode.setdefault(frame["episode_id"], []).append(frame["step"])
  successes = {k for k in all_episodes if droid.is_success(k.split("--")[1])}
  assert by_episode and set(by_episode) <= successes
  expected_drops = 0
  for key in successes:
    episode = all_episodes[key]
    ranges = droid.keep_ranges(episode["action_dict"]["joint_velocity"])
    kept = droid.ranges_to_mask(ranges, len(episode["is_first"]))
    instructed = np.array(
      [any(episode[k][t] for k in droid.INSTRUCTION_KEYS) for t in range(len(kept))]
    )
    if not instructed.any():
      expected_drops += 1  # A whole episode without instructions counts once.
      continue
    assert by_episode.get(key, []) == np.flatnonzero(kept & instructed).tolist()
    expected_drops += int((kept & ~instructed).sum())
  # Frames without an instruction are bad input: counted, never silently gone.
  assert dropped == [Dropped("no_instruction")] * expected_drops
  # Images are the JPEG bytes as stored, and state/actions come from the episode's vectors.
  frame = frames[0]
  episode = all_episodes[frame["episode_id"]]
  t = frame["step"]
  assert frame["images"]["wrist_image_left"] == episode["observation"]["wrist_image_left"][t]
  assert frame["images"]["wrist_image_left"][:2] == b"\xff\xd8"
  np.testing.assert_allclose(
    frame["state"][:7], episode["observation"]["joint_position"][t], rtol=1e-6
  )


def test_hosts_read_disjoint_shards(rlds_dir):
  ids = [
    {
      f["episode_id"]
      for f in frames_of(stream(rlds_dir, process_index=i, process_count=2, num_epochs=1))
    }
    for i in range(2)
  ]
  everything = {f["episode_id"] for f in frames_of(stream(rlds_dir, num_epochs=1))}
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  assert ids[0] | ids[1] == everything


def test_stream_state_restores_mid_episode(rlds_dir):
  iterator = iter(stream(rlds_dir, seed=3))
  for _ in range(37):  # Past the first episode's frames: the state points inside a record.
    next(iterator)
  state = iterator.get_state()
  assert state["item"] > 0 or state["record"] > 0
  expected = [next(iterator) for _ in range(60)]  # Crosses into the next shard and epoch.
  restored = iter(stream(rlds_dir, seed=3))
  restored.set_state(state)
  assert [key(next(restored)) for _ in expected] == [key(e) for e in expected]


def test_streaming_pipeline_resumes_exactly(rlds_dir, tmp_path):
  c = pipeline.default_config()
  c.update(
    dict(
      source="rlds",
      rlds_dir=rlds_dir,
      shuffle_window=16,
    )
  )
  all_frames = frames_of(stream(rlds_dir, num_epochs=1))
  kwargs = dict(
    tokenizer=fixtures.tokenizer(tmp_path),
    norm_stats=fixtures.norm_stats(all_frames),
    split="train",
    seed=5,
    process_index=0,
    process_count=1,
    per_host_batch_size=4,
    train=True,
  )
  iterator = pipeline.make_iterator(c, fixtures.model_config(), **kwargs)
  try:
    for _ in range(5):
      next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
  finally:
    iterator.close()
  restored = pipeline.make_iterator(c, fixtures.model_config(), **kwargs)
  try:
    restored.set_state(state)
    for batch in expected:
      jax.tree.map(np.testing.assert_array_equal, batch, next(restored))
    assert restored.drop_counts == iterator.drop_counts
  finally:
    restored.close()


def test_window_shuffle_reorders_frames(rlds_dir):
  import grain

  plain = [key(f) for f in stream(rlds_dir, num_epochs=1)]
  shuffled = grain.experimental.WindowShuffleIterDataset(
    stream(rlds_dir, num_epochs=1), window_size=32, seed=0
  )
  shuffled = [key(f) for f in shuffled]
  assert sorted(map(str, shuffled)) == sorted(map(str, plain)) and shuffled != plain


def test_missing_or_unreadable_shard_is_an_error_naming_it(rlds_dir, tmp_path):
  broken = str(tmp_path / "broken")
  shutil.copytree(rlds_dir, broken)
  shards = sorted(f for f in os.listdir(broken) if ".tfrecord-" in f)
  os.remove(os.path.join(broken, shards[0]))
  with pytest.raises(FileNotFoundError, match=shards[0]):
    stream(broken)
  garbled = str(tmp_path / "garbled")
  shutil.copytree(rlds_dir, garbled)
  with open(os.path.join(garbled, shards[1]), "r+b") as f:
    f.seek(100)
    f.write(b"\x00" * 64)
  with pytest.raises(OSError, match=shards[1]):
    list(stream(garbled, num_epochs=1))
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    stream(str(tmp_path))


@pytest.mark.slow  # Two rounds of spawned workers that each import TensorFlow: ~25-40 s.
def test_worker_processes_split_the_stream_and_resume_exactly(rlds_dir, tmp_path):
  # mp_prefetch hands each worker a slice through ShardedTfdsIterDataset.set_slice: one pass with
  # two workers must yield exactly the frames one process yields, and a restore mid-pass must
  # continue with exactly the batches the original went on to produce.
  elements = list(stream(rlds_dir, num_epochs=1))  # Frames and the stream's own drop markers.
  # Long enough that no prompt is dropped: which instruction a frame draws depends on the worker
  # layout (Grain seeds per worker), and with it whether a tight limit would drop the frame.
  kwargs = dict(
    tokenizer=fixtures.tokenizer(tmp_path, max_token_len=256),
    norm_stats=fixtures.norm_stats(frames_of(elements)),
    split="train",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=1,
    train=False,
  )

  def make(workers):
    c = pipeline.default_config()
    c.update(
      dict(
        source="rlds",
        rlds_dir=rlds_dir,
        num_workers=workers,
      )
    )
    return pipeline.make_iterator(c, fixtures.model_config(), **kwargs)

  single = make(0)
  single_states = sorted(batch.observation.state.tobytes() for batch in single)
  # Every frame is either in a batch or counted.
  assert len(single_states) + sum(single.drop_counts.values()) == len(elements)

  iterator = make(2)
  try:
    head = [next(iterator) for _ in range(40)]
    state = iterator.get_state()
    tail = list(iterator)
    drops = iterator.drop_counts
  finally:
    iterator.close()
  assert sorted(b.observation.state.tobytes() for b in head + tail) == single_states
  # A drop after a worker's last kept frame of a finite pass has no example to ride on (see
  # pipeline._DropCountingIterator); training repeats forever, so there it never happens.
  assert all(drops[reason] <= single.drop_counts[reason] for reason in drops)

  restored = make(2)
  try:
    restored.set_state(state)
    for batch in tail[:5]:
      jax.tree.map(np.testing.assert_array_equal, batch, next(restored))
  finally:
    restored.close()
