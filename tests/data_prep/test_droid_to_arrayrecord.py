"""ki.data.prepare, the conversion of data_prep.droid_to_arrayrecord: filter counts, records,
parallel equality, bad input and its counts."""

import io
import json
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ki.data import droid, prepare, prepared_frames, records, rlds_writer, synthetic_droid


def _all_frames(data_dir):
  source = prepared_frames.open_frames(str(data_dir))
  return [
    records.decode_frame(data, action_horizon=16)
    for data in source.__getitems__(list(range(len(source))))
  ]


def _expected_kept_frames(num_episodes):
  """Kept frames per episode id, from the generator's plans and openpi's idle rule."""
  expected = {}
  for index in range(num_episodes):
    plan = synthetic_droid.plan_episode(0, index)
    if plan.failure or not any(plan.instructions):
      continue
    velocity = np.diff(plan.joints, axis=0, append=plan.joints[-1:]) * droid.CONTROL_HZ
    kept = droid.ranges_to_mask(droid.keep_ranges(velocity), len(plan.joints)).sum()
    expected[f"episode_{index:05d}"] = int(kept)
  return expected


def test_manifest_counts_every_filter(prepared_droid, synthetic_dataset):
  prepared, manifest = prepared_droid
  _, info = synthetic_dataset
  counts = manifest["counts"]
  assert counts["episodes_seen"] == info["episodes"] == 12
  assert counts["episodes_dropped_failure"] == 1 and counts["episodes_dropped_no_instruction"] == 1
  assert counts["episodes_kept"] == 10 and counts["episodes_dropped_bad"] == 0
  expected = _expected_kept_frames(info["episodes"])
  assert counts["frames_kept"] == manifest["num_records"] == sum(expected.values())
  assert counts["frames_seen"] == counts["frames_kept"] + counts["frames_dropped_idle"]
  assert manifest["source"]["dataset_version"] == "1.0.1"
  assert manifest["settings"]["action_horizon"] == 16
  assert [s["path"] for s in manifest["shards"]] == [
    f"droid-train.array_record-{i:05d}-of-00003" for i in range(3)
  ]
  assert sum(s["records"] for s in manifest["shards"]) == manifest["num_records"]
  frames = _all_frames(prepared)
  per_episode = {}
  for frame in frames:
    name = re.search(r"episode_\d+", frame["episode_id"]).group()
    per_episode[name] = per_episode.get(name, 0) + 1
  assert per_episode == expected


def test_records_hold_stored_jpegs_state_and_chunks(prepared_droid, synthetic_dataset):
  prepared, _ = prepared_droid
  out_dir, info = synthetic_dataset
  frame = _all_frames(prepared)[20]
  builder = tfds.builder_from_directory(str(out_dir / info["dataset_dir"]))
  skip = tfds.decode.SkipDecoding()
  decoders = {"steps": {"observation": {c: skip for c in droid.CAMERA_NAMES}}}
  for episode in tfds.as_numpy(builder.as_dataset(split="train", decoders=decoders)):
    meta = episode["episode_metadata"]
    key = droid.episode_key(meta["recording_folderpath"].decode(), meta["file_path"].decode())
    if key == frame["episode_id"]:
      steps = list(episode["steps"])
      break
  step = steps[frame["step"]]
  assert frame["episode_length"] == len(steps)
  for camera in droid.CAMERA_NAMES:
    assert frame["images"][camera] == step["observation"][camera]  # Not re-encoded.
  assert Image.open(io.BytesIO(frame["images"]["wrist_image_left"])).size == (320, 180)
  np.testing.assert_allclose(frame["state"][:7], step["observation"]["joint_position"], rtol=1e-6)
  for h in range(16):
    source = steps[min(frame["step"] + h, len(steps) - 1)]["action_dict"]
    np.testing.assert_allclose(frame["actions"][h, :7], source["joint_position"], rtol=1e-6)
    np.testing.assert_allclose(frame["actions"][h, 7:], source["gripper_position"], rtol=1e-6)
  assert frame["instructions"] == [step[k].decode() for k in droid.INSTRUCTION_KEYS]


def test_parallel_workers_write_the_same_shards(prepared_droid, synthetic_dataset, tmp_path):
  prepared, manifest = prepared_droid
  out_dir, info = synthetic_dataset
  settings = prepare.Settings(rlds_dir=str(out_dir / info["dataset_dir"]), out_dir=str(tmp_path))
  parallel = prepare.run(settings, num_workers=2)
  assert parallel["counts"] == manifest["counts"]
  for shard in manifest["shards"]:
    assert (tmp_path / shard["path"]).read_bytes() == (prepared / shard["path"]).read_bytes()


def test_keep_ranges_json_replaces_the_idle_rule(synthetic_dataset, tmp_path):
  out_dir, info = synthetic_dataset
  rlds_dir = str(out_dir / info["dataset_dir"])
  first = synthetic_droid.make_episode(0, 0)["episode_metadata"]
  key = droid.episode_key(first["recording_folderpath"], first["file_path"])
  ranges_path = str(tmp_path / "keep_ranges.json")
  droid.save_keep_ranges({key: [(0, 5), (10, 12)]}, ranges_path)
  manifest = prepare.run(
    prepare.Settings(
      rlds_dir=rlds_dir,
      out_dir=str(tmp_path / "out"),
      keep_ranges_json=ranges_path,
      action_space="joint_velocity",
      action_horizon=4,
    )
  )
  assert manifest["num_records"] == 7
  # 12 episodes: 1 failure, 1 without instruction, 1 listed, 9 absent from the JSON.
  assert manifest["counts"]["episodes_dropped_not_in_keep_ranges"] == 9
  frames = [
    records.decode_frame(d, action_horizon=4)
    for d in prepared_frames.open_frames(str(tmp_path / "out")).__getitems__(list(range(7)))
  ]
  assert sorted(f["step"] for f in frames) == [0, 1, 2, 3, 4, 10, 11]
  assert manifest["settings"]["idle_filter"] == "keep_ranges_json"


def _bad_episode(index):
  """Episodes 0-4 of the synthetic generator, with bad input planted in 1-3."""
  episode = synthetic_droid.make_episode(0, index)
  steps = episode["steps"]
  if index == 1:
    steps[20]["observation"]["joint_position"] = np.full(7, np.nan)  # Drops frame 20.
    steps[40]["action_dict"]["joint_position"] = np.full(7, np.inf)  # Drops chunks 25..40.
  elif index == 2:
    for step in steps:
      step["observation"]["wrist_image_left"] = io.BytesIO(b"corrupt jpeg")  # Kept as stored.
  elif index == 3:
    pass  # Generator's episode 3 has no instruction.
  return episode


@pytest.fixture(scope="module")
def bad_rlds(tmp_path_factory):
  """An RLDS dataset with planted bad input, plus one record that does not parse at all and one
  whose joint_position has 6 values instead of 7."""
  root = tmp_path_factory.mktemp("bad_rlds")
  version_dir = rlds_writer.write_rlds_dataset(
    str(root), _bad_episode, 5, num_shards=1, description="bad input test"
  )
  shard = str(
    next(p for p in sorted(tfds.builder_from_directory(version_dir).info.splits["train"].filepaths))
  )
  serialized = list(tf.data.TFRecordDataset(shard).as_numpy_iterator())
  wrong_shape = tf.train.Example.FromString(serialized[0])
  values = wrong_shape.features.feature["steps/observation/joint_position"].float_list.value
  del values[-1]
  with tf.io.TFRecordWriter(shard) as writer:
    for record in serialized + [b"not a tf.train.Example", wrong_shape.SerializeToString()]:
      writer.write(record)
  return version_dir


def test_bad_input_is_skipped_and_counted(bad_rlds, tmp_path):
  manifest = prepare.run(prepare.Settings(rlds_dir=bad_rlds, out_dir=str(tmp_path)))
  counts = manifest["counts"]
  assert counts["episodes_seen"] == 7
  assert counts["episodes_dropped_unreadable"] == 2  # Garbage record + 6-value joint_position.
  assert counts["episodes_dropped_no_instruction"] == 1
  assert counts["episodes_kept"] == 4  # Including the corrupt-JPEG and NaN episodes.
  frames = _all_frames(tmp_path)
  nan_episode = [f["step"] for f in frames if "episode_00001" in f["episode_id"]]
  assert 20 not in nan_episode and not set(range(25, 41)) & set(nan_episode)
  plan = synthetic_droid.plan_episode(0, 1)
  velocity = np.diff(plan.joints, axis=0, append=plan.joints[-1:]) * droid.CONTROL_HZ
  kept = set(np.flatnonzero(droid.ranges_to_mask(droid.keep_ranges(velocity), len(plan.joints))))
  expected_bad = len(kept & ({20} | set(range(25, 41))))
  assert counts["frames_dropped_bad"] == expected_bad > 0
  assert sorted(nan_episode) == sorted(kept - {20} - set(range(25, 41)))
  assert counts["frames_kept"] == len(frames) == manifest["num_records"]
  corrupt = [f for f in frames if "episode_00002" in f["episode_id"]]
  assert corrupt and all(f["images"]["wrist_image_left"] == b"corrupt jpeg" for f in corrupt)


def test_episode_with_wrong_shapes_raises_bad_episode():
  import collections

  steps = droid.stack_steps(synthetic_droid.make_episode(0, 0)["steps"])
  length = len(steps["is_first"])
  counts = collections.Counter()
  metadata = {"file_path": "x/success/t.h5", "recording_folderpath": "x/MP4"}
  # Decoded images instead of JPEG bytes are wrong too, and named.
  with pytest.raises(droid.BadEpisodeError, match="exterior_image_1_left has shape"):
    droid.episode_frames(metadata, steps, counts)
  for camera in droid.CAMERA_NAMES:
    steps["observation"][camera] = [b"jpeg"] * length
  assert len(droid.episode_frames(metadata, steps, counts)) > 0
  steps["action_dict"]["joint_velocity"] = steps["action_dict"]["joint_velocity"][:, :6]
  with pytest.raises(droid.BadEpisodeError, match="joint_velocity has shape"):
    droid.episode_frames(metadata, steps, counts)
  assert counts["episodes_dropped_bad"] == 2 and counts["episodes_kept"] == 1


def test_missing_or_unreadable_input_names_it(synthetic_dataset, tmp_path):
  out_dir, info = synthetic_dataset
  with pytest.raises(FileNotFoundError, match="nowhere.*dataset_info.json"):
    prepare.run(prepare.Settings(rlds_dir=str(tmp_path / "nowhere"), out_dir=str(tmp_path)))
  copy = tmp_path / "copy"
  shutil.copytree(out_dir / info["dataset_dir"], copy)
  features = json.loads((copy / "features.json").read_text())
  steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]
  del steps["features"]["action_dict"]["featuresDict"]["features"]["joint_velocity"]
  (copy / "features.json").write_text(json.dumps(features))
  with pytest.raises(ValueError, match="steps/action_dict/joint_velocity is missing"):
    prepare.open_rlds(str(copy))
  shutil.rmtree(copy)
  shutil.copytree(out_dir / info["dataset_dir"], copy)
  shard = copy / "droid-train.tfrecord-00001-of-00003"
  shard.write_bytes(shard.read_bytes()[:5000])  # Truncated mid-record.
  with pytest.raises(OSError, match="cannot read shard .*tfrecord-00001-of-00003"):
    prepare.run(prepare.Settings(rlds_dir=str(copy), out_dir=str(tmp_path / "a")))
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="missing.*tfrecord-00001-of-00003"):
    prepare.run(prepare.Settings(rlds_dir=str(copy), out_dir=str(tmp_path / "b")))
