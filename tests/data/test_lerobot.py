"""LeRobot datasets (v2.1 and v3.0): the synthetic writer, the reader, the robot spec and the
pipeline around them (drop counting, per-host episodes, exact resume with workers, mixing)."""

import inspect
import json
import os
import re
import shutil

import av
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ki.batch import BASE_SLOT, LEFT_WRIST_SLOT, Batch
from ki.data import lerobot, normalize, pipeline, robot_spec
from ki.data import synthetic_lerobot as synthetic
from ki.data.transforms import DROP_REASONS
from ki.model import pi05
from ki.tokenizers import fast, prompt
from tests.data import pipeline_fixtures as fixtures

HORIZON = 4
IMAGE = 32  # the stored frames' side
EPISODES = 3
SEED = 5
MAX_TOKEN_LEN = 160
CAMERAS = (("image", BASE_SLOT), ("wrist_image", LEFT_WRIST_SLOT))


def model_config(**overrides) -> pi05.Config:
  fields = dict(
    vlm_variant="tiny",
    expert_variant="tiny",
    siglip_variant="mu/16",
    image_size=32,
    action_dim=10,
    data_action_dim=synthetic.ACTION_DIM,
    action_horizon=HORIZON,
    max_token_len=MAX_TOKEN_LEN,
    max_loss_tokens=48,
  )
  return pi05.Config(**{**fields, **overrides}).validate()


MODEL = model_config()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("lerobot")
  paths = {}
  for version in synthetic.VERSIONS:
    paths[version] = str(root / version)
    synthetic.generate(
      paths[version],
      version=version,
      episodes=EPISODES,
      seed=SEED,
      image_size=IMAGE,
      episodes_per_file=2,
    )
  paths["image"] = str(root / "image")
  synthetic.generate(
    paths["image"], version="v3.0", episodes=2, seed=SEED, image_size=IMAGE, image_storage="image"
  )
  episodes = [synthetic.make_episode(SEED, i, IMAGE) for i in range(EPISODES)]
  rng = np.random.default_rng(0)
  texts = [prompt.robot_prompt_text(e["task"], rng.uniform(-1, 1, 8)) for e in episodes] * 20 + [
    "what is item 3? red"
  ] * 20
  sp = prompt.build_sentencepiece_model(texts, str(root / "sp.model"), text_vocab_size=300)
  chunks = rng.uniform(-1, 1, (200, HORIZON, synthetic.ACTION_DIM))
  tokenizer = prompt.Pi05Tokenizer(
    prompt.PromptTokenizer(sp),
    fast.FastTokenizer.fit(chunks, vocab_size=200),
    max_token_len=MAX_TOKEN_LEN,
  )
  stats = {"state": normalize.RunningStats(), "actions": normalize.RunningStats()}
  for e in episodes:
    stats["state"].update(e["state"])
    stats["actions"].update(e["actions"])
  return {
    **paths,
    "root": root,
    "episodes": episodes,
    "tokenizer": tokenizer,
    "stats": {k: v.get_statistics() for k, v in stats.items()},
  }


def frames(path, horizon=HORIZON, **kwargs):
  return lerobot.LeRobotFrames(
    lerobot.open_dataset(path),
    cameras=("image", "wrist_image"),
    state_key="state",
    action_key="actions",
    action_horizon=horizon,
    **kwargs,
  )


def copy(data, version, name):
  target = str(data["root"] / name)
  shutil.copytree(data[version], target)
  return target


# --- The writer ---------------------------------------------------------------------------------


def test_generator_is_byte_stable(tmp_path):
  for name in ("a", "b"):
    synthetic.generate(str(tmp_path / name), version="v3.0", episodes=2, seed=1, image_size=16)
  files = sorted(
    os.path.relpath(os.path.join(d, f), tmp_path / "a")
    for d, _, fs in os.walk(tmp_path / "a")
    for f in fs
  )
  assert any(f.endswith(".mp4") for f in files) and any(f.endswith(".parquet") for f in files)
  for f in files:
    with open(tmp_path / "a" / f, "rb") as x, open(tmp_path / "b" / f, "rb") as y:
      assert x.read() == y.read(), f


def test_versions_have_their_layouts(data):
  assert os.path.exists(os.path.join(data["v2.1"], "meta", "episodes.jsonl"))
  assert os.path.exists(os.path.join(data["v2.1"], "videos/chunk-000/image/episode_000002.mp4"))
  assert os.path.exists(os.path.join(data["v3.0"], "meta", "tasks.parquet"))
  # Two episodes per file: episodes 0-1 in file 0, episode 2 in file 1.
  assert os.path.exists(os.path.join(data["v3.0"], "videos/image/chunk-000/file-001.mp4"))
  assert not os.path.exists(os.path.join(data["v3.0"], "videos/image/chunk-000/file-002.mp4"))


# --- Reading back -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", synthetic.VERSIONS)
def test_both_versions_read_back_what_was_written(data, version):
  source = frames(data[version])
  decoded = {}
  assert source.dataset.version == version
  assert len(source) == sum(len(e["state"]) for e in data["episodes"])
  for index in range(len(source)):
    item = source[index]
    episode = data["episodes"][item["episode_index"]]
    t, length = item["frame_index"], len(episode["state"])
    np.testing.assert_array_equal(item["state"], episode["state"][t])
    chunk = np.minimum(np.arange(t, t + HORIZON), length - 1)
    np.testing.assert_array_equal(item["actions"], episode["actions"][chunk])
    assert item["prompt"] == episode["task"]
    for key in ("image", "wrist_image"):
      # Exactly the mp4's frame at the row's timestamp (every frame decoded in order)...
      path, start = source.dataset.episodes[item["episode_index"]].videos[key]
      if path not in decoded:
        with av.open(path) as container:
          decoded[path] = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
      offset = round(start * synthetic.FPS)
      np.testing.assert_array_equal(item["images"][key], decoded[path][offset + t])
      # ... which is the written frame up to H.264's loss.
      assert np.abs(item["images"][key].astype(int) - episode[key][t]).mean() < 6


def test_parquet_embedded_images_read_back_exactly(data):
  source = frames(data["image"])
  episodes = [synthetic.make_episode(SEED, i, IMAGE) for i in range(2)]
  for index in (0, 7, len(source) - 1):
    item = source[index]
    episode = episodes[item["episode_index"]]
    for key in ("image", "wrist_image"):
      np.testing.assert_array_equal(item["images"][key], episode[key][item["frame_index"]])


def test_action_chunks_are_end_clamped_within_the_episode(data):
  source = frames(data["v3.0"], horizon=6)
  episode = data["episodes"][0]
  length = len(episode["state"])
  last = source[length - 1]  # the last frame of episode 0: the chunk repeats its last row
  assert last["episode_index"] == 0
  np.testing.assert_array_equal(last["actions"], np.repeat(episode["actions"][-1:], 6, axis=0))
  near_end = source[length - 3]
  np.testing.assert_array_equal(near_end["actions"][:3], episode["actions"][-3:])
  np.testing.assert_array_equal(near_end["actions"][3:], episode["actions"][[-1, -1, -1]])
  # The next item starts episode 1 and never reads episode 0's rows.
  assert source[length]["episode_index"] == 1 and source[length]["frame_index"] == 0


def test_timestamps_map_to_frame_indices(data):
  dataset = lerobot.open_dataset(data["v3.0"])
  decoder = lerobot.VideoDecoder()
  episode = dataset.episodes[2]
  path, start = dataset.episodes[1].videos["image"]  # second in its file: it starts later
  assert start == pytest.approx(dataset.episodes[0].length / synthetic.FPS)
  tolerance = 0.5 / dataset.fps
  truth = data["episodes"][1]["image"]
  for t in (0, 1, 7, 20, len(truth) - 1):
    for jitter in (-0.3, 0.0, 0.3):  # within half a frame period: still frame t
      time = start + (t + jitter) / dataset.fps
      image = decoder.frame_at(path, time, tolerance)
      errors = [np.abs(image.astype(int) - truth[s]).mean() for s in range(len(truth))]
      assert errors[t] == min(errors)
  with pytest.raises(LookupError):  # past the file's last frame
    decoder.frame_at(episode.videos["image"][0], 10.0, tolerance)


# --- Errors and bad input -----------------------------------------------------------------------


def test_not_a_lerobot_folder_names_folder_and_contents(tmp_path):
  (tmp_path / "stuff.txt").write_text("x")
  with pytest.raises(lerobot.NotALeRobotDatasetError, match="no meta/info.json.*stuff.txt"):
    lerobot.open_dataset(str(tmp_path))
  with pytest.raises(lerobot.NotALeRobotDatasetError, match="not found"):
    lerobot.open_dataset(str(tmp_path / "missing"))


def test_unsupported_version_is_named(data):
  root = copy(data, "v2.1", "other_version")
  info_path = os.path.join(root, "meta", "info.json")
  with open(info_path) as f:
    info = json.load(f)
  readable = "it reads v2.0, v2.1, v3.0"
  for version, says in (
    ("v1.6", "older than this reader supports"),
    ("v9.9", "newer than this reader supports"),
    ("next", "not a version this reader knows"),
  ):
    with open(info_path, "w") as f:
      json.dump(dict(info, codebase_version=version), f)
    with pytest.raises(lerobot.NotALeRobotDatasetError) as error:
      lerobot.open_dataset(root)
    message = str(error.value)
    assert root in message and f"codebase_version {version!r}, {says}: {readable}" in message
    # Converting is advice for older datasets only.
    assert ("conversion scripts" in message) == (version == "v1.6"), message


def test_every_reason_the_reader_returns_is_documented():
  # The reasons LeRobotFrames can return, read off its source.
  source = inspect.getsource(lerobot)
  returned = set(re.findall(r'Dropped\("(\w+)"\)', source))
  assert {"corrupt_video", "missing_frame", "bad_shape"} <= returned
  listed = set(re.findall(r"^  (\w+) ", lerobot.__doc__, flags=re.MULTILINE))
  assert returned <= listed, f"not in ki/data/lerobot.py's docstring: {returned - listed}"
  assert returned <= set(DROP_REASONS)


def _rewrite_parquet(path, change):
  table = pq.read_table(path)
  columns = {name: table.column(name).to_pylist() for name in table.column_names}
  change(columns)
  pq.write_table(
    pa.table({k: pa.array(v, table.schema.field(k).type) for k, v in columns.items()}), path
  )


def _drops_of(data, root, horizon=HORIZON, **config_overrides):
  """One pass through the pipeline: (kept examples, drop counts)."""
  c = lerobot_config(root, **config_overrides)
  iterator = pipeline.make_iterator(
    c,
    model_config(action_horizon=horizon),
    tokenizer=data["tokenizer"],
    norm_stats=data["stats"],
    split="train",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=1,
    train=False,
  )
  try:
    kept = sum(len(b.observation.has_actions) for b in iterator)
  finally:
    iterator.close()
  return kept, {k: v for k, v in iterator.drop_counts.items() if v}


def lerobot_config(root, **overrides):
  c = pipeline.default_config()
  c.source = "lerobot"
  c.lerobot_dir = str(root)
  c.delta_action_mask = ()
  c.read_threads = 1
  c.update(overrides)
  return c


def test_clean_dataset_drops_nothing(data):
  kept, drops = _drops_of(data, data["v2.1"])
  assert drops == {} and kept == sum(len(e["state"]) for e in data["episodes"])


def test_every_kind_of_bad_input_is_skipped_and_counted(data):
  # Drops ride on the next kept example, so the last episode keeps good frames at its end.
  lengths = [len(e["state"]) for e in data["episodes"]]
  root = copy(data, "v2.1", "bad")
  chunk = os.path.join(root, "data", "chunk-000")

  def orphan_task(columns):  # episode 0: a task index that names no task
    columns["task_index"][:] = [99] * len(columns["task_index"])

  _rewrite_parquet(os.path.join(chunk, "episode_000000.parquet"), orphan_task)

  def drop_row(columns):  # episode 1: frame 5's row is missing
    for values in columns.values():
      del values[5]

  _rewrite_parquet(os.path.join(chunk, "episode_000001.parquet"), drop_row)

  def poison(columns):  # episode 2: NaN state at frame 3, inf action at row 10
    columns["state"][3] = [float("nan")] * 8
    columns["actions"][10] = [float("inf")] * 7

  _rewrite_parquet(os.path.join(chunk, "episode_000002.parquet"), poison)
  kept, drops = _drops_of(data, root)
  # The inf action sits in the chunks of frames 10 - H + 1 .. 10.
  assert drops == {
    "no_instruction": lengths[0],
    "missing_frame": lengths[1],
    "non_finite": 1 + HORIZON,
  }
  assert kept == lengths[2] - 1 - HORIZON


def _truncate(path, keep_fraction=0.5):
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[: int(len(content) * keep_fraction)])


def test_truncated_and_unreadable_videos_count_as_corrupt_video(data):
  lengths = [len(e["state"]) for e in data["episodes"]]
  # v3.0: file 0 holds episodes 0 and 1; its front-camera mp4 is cut in half.
  root = copy(data, "v3.0", "truncated_video")
  _truncate(os.path.join(root, "videos", "image", "chunk-000", "file-000.mp4"))
  kept, drops = _drops_of(data, root)
  assert drops == {"corrupt_video": lengths[0] + lengths[1]} and kept == lengths[2]
  # v2.1: episode 0's wrist mp4 is not a video at all.
  root = copy(data, "v2.1", "junk_video")
  with open(
    os.path.join(root, "videos", "chunk-000", "wrist_image", "episode_000000.mp4"), "wb"
  ) as f:
    f.write(b"not a video at all")
  kept, drops = _drops_of(data, root)
  assert drops == {"corrupt_video": lengths[0]} and kept == lengths[1] + lengths[2]


def _index_first(path):
  """Rewrites an mp4 with its index (moov box) before the frames, as lerobot's encoder writes
  them (ffmpeg's +faststart), so that the file still opens when its end is cut off."""
  moved = path + ".faststart.mp4"
  with av.open(path) as source, av.open(moved, "w", options={"movflags": "faststart"}) as target:
    stream = target.add_stream_from_template(source.streams.video[0])
    for packet in source.demux(source.streams.video[0]):
      if packet.dts is None:  # the demuxer's flush packet
        continue
      packet.stream = stream
      target.mux(packet)
  os.replace(moved, path)
  with open(path, "rb") as f:
    assert f.read(64).find(b"moov") >= 0


def test_truncated_video_with_its_index_first_counts_as_corrupt_video(data):
  """A file cut short still opens when its index comes first, and its decoder simply stops:
  the frames past the cut are corrupt_video (the file is damaged), not missing_frame."""
  lengths = [len(e["state"]) for e in data["episodes"]]
  root = copy(data, "v3.0", "truncated_index_first")
  path = os.path.join(root, "videos", "image", "chunk-000", "file-000.mp4")  # episodes 0 and 1
  _index_first(path)
  _truncate(path)
  with av.open(path) as container:
    assert container.streams.video[0].frames == lengths[0] + lengths[1]  # it opens
  kept, drops = _drops_of(data, root)
  assert set(drops) == {"corrupt_video"}, drops
  # The frames before the cut decode and are kept.
  assert (lengths[0] + lengths[1]) // 3 <= drops["corrupt_video"] < lengths[0] + lengths[1]
  assert kept + drops["corrupt_video"] == sum(lengths)


def test_missing_frame_at_a_timestamp(data):
  root = copy(data, "v3.0", "late_timestamp")

  def shift(columns):  # file 1 holds episode 2: its frame 2 points past the end of the video
    columns["timestamp"][2] = columns["timestamp"][2] + 100.0

  _rewrite_parquet(os.path.join(root, "data", "chunk-000", "file-001.parquet"), shift)
  kept, drops = _drops_of(data, root)
  assert drops == {"missing_frame": 1}


def test_short_episodes_are_counted(data):
  lengths = [len(e["state"]) for e in data["episodes"]]
  # Longer than episodes 0 and 1 (or one of them), not than the last one (see above).
  horizon = min(max(lengths[0], lengths[1]), lengths[2])
  short = [n for n in lengths if n < horizon]
  assert short
  flow_only = prompt.Pi05Tokenizer(
    data["tokenizer"].prompt_tokenizer, None, max_token_len=MAX_TOKEN_LEN
  )
  kept, drops = _drops_of(dict(data, tokenizer=flow_only), data["v3.0"], horizon=horizon)
  assert drops == {"short_episode": sum(short)}
  assert kept == sum(lengths) - sum(short)


# --- The robot spec -----------------------------------------------------------------------------


def test_robot_spec_lists_every_problem_and_the_features(data):
  dataset = lerobot.open_dataset(data["v3.0"])
  robot_spec.validate(robot_spec.default_config(), dataset, MODEL)  # LIBERO's keys fit
  spec = robot_spec.default_config()
  spec.cameras = (("image", BASE_SLOT), ("top_camera", "right_wrist_0_rgb"), ("state", "eye"))
  spec.state_key = "observation.state"
  spec.action_key = "actions"
  spec.prompt = "language"
  with pytest.raises(robot_spec.RobotSpecError) as error:
    robot_spec.validate(
      spec, dataset, model_config(data_action_dim=8), delta_action_mask=(True,) * 3
    )
  message = str(error.value)
  for expected in (
    "'top_camera' is not a feature",
    "'right_wrist_0_rgb', not in model.image_keys",
    "camera 'state' has dtype 'float32'",
    "'eye', not a slot",
    "state_key 'observation.state' is not a feature",
    "have 7 dims but model.data_action_dim is 8",
    "delta_action_mask has 3 entries",
    "prompt 'language'",
    "image (video [32, 32, 3])",
    "state (float32 [8])",
  ):
    assert expected in message, (expected, message)
  assert "8 problem(s)" in message


def test_pipeline_refuses_a_bad_spec_before_reading(data):
  c = lerobot_config(data["v3.0"])
  c.robot.action_key = "action"
  with pytest.raises(robot_spec.RobotSpecError, match="action_key 'action' is not a feature"):
    pipeline.validate_config(
      c, MODEL, split="train", process_index=0, process_count=1, per_host_batch_size=2
    )
  with pytest.raises(lerobot.NotALeRobotDatasetError):
    pipeline.validate_config(
      lerobot_config(data["root"]),
      MODEL,
      split="train",
      process_index=0,
      process_count=1,
      per_host_batch_size=2,
    )


# --- The pipeline -------------------------------------------------------------------------------


def make(data, c, *, batch=4, process_index=0, process_count=1, train=True, split="train"):
  return pipeline.make_iterator(
    c,
    MODEL,
    tokenizer=data["tokenizer"],
    norm_stats=data["stats"],
    split=split,
    seed=3,
    process_index=process_index,
    process_count=process_count,
    per_host_batch_size=batch,
    train=train,
  )


def test_batches_follow_the_batch_contract(data):
  batch = next(make(data, lerobot_config(data["v3.0"])))
  assert isinstance(batch, Batch)
  expected = jax.tree.map(lambda x: (x.shape, x.dtype.type), fixtures_fake_batch(4))
  assert jax.tree.map(lambda x: (x.shape, x.dtype.type), batch) == expected
  assert batch.observation.image_masks[BASE_SLOT].all()
  # 7 real action dims, zero padding after them; the FAST postfix is there.
  assert np.all(batch.actions[..., 7:] == 0) and np.any(batch.actions[..., :7] != 0)
  assert batch.observation.token_loss_mask.any()


def fixtures_fake_batch(b):
  from ki.batch import fake_batch

  return fake_batch(MODEL, b)


def test_hosts_read_disjoint_whole_episodes(data):
  dataset = lerobot.open_dataset(data["v3.0"])
  seen = []
  for host in range(2):
    positions = lerobot.split_episodes(
      EPISODES, split="train", eval_episodes=0, process_index=host, process_count=2
    )
    source = frames(data["v3.0"], episodes=positions)
    episodes = {source[i]["episode_index"] for i in range(len(source))}
    assert episodes == {dataset.episodes[p].index for p in positions}
    assert len(source) == sum(dataset.episodes[p].length for p in positions)
    seen.append(episodes)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(EPISODES))
  # The eval split is the last episodes, never read in training.
  train = lerobot.split_episodes(
    3, split="train", eval_episodes=1, process_index=0, process_count=1
  )
  evals = lerobot.split_episodes(3, split="eval", eval_episodes=1, process_index=0, process_count=1)
  assert train == [0, 1] and evals == [2]
  # Each host's pipeline runs on its share.
  for host in range(2):
    batch = next(make(data, lerobot_config(data["v3.0"]), process_index=host, process_count=2))
    assert batch.actions.shape == (4, HORIZON, 10)


def test_resume_with_worker_processes_is_exact(data):
  c = lerobot_config(data["v3.0"], num_workers=2)
  iterator = make(data, c)
  try:
    for _ in range(2):
      next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
  finally:
    iterator.close()
  restored = make(data, c)
  try:
    restored.set_state(state)
    for batch in expected:
      jax.tree.map(np.testing.assert_array_equal, batch, next(restored))
  finally:
    restored.close()


def test_mixes_with_vlm_co_training(data, tmp_path):
  manifest = fixtures.vlm_manifest(tmp_path, count=8)
  c = lerobot_config(
    data["v2.1"], vlm_sources=({"kind": "jsonl", "path": manifest, "weight": 1.0},)
  )
  iterator = make(data, c, batch=8)
  has_actions = np.concatenate([next(iterator).observation.has_actions for _ in range(3)])
  assert 0 < has_actions.sum() < len(has_actions)


def test_streams_hold_out_eval_episodes(data):
  from ki.train import config as config_lib

  config = config_lib.default_config()
  config.data = lerobot_config(data["v3.0"], lerobot_eval_episodes=1)
  config.batch_size = 4
  config.eval.batch_size = 2
  config.eval.every = 10
  streams = pipeline.make_streams(
    config, MODEL, data["tokenizer"], data["stats"], process_index=0, process_count=1
  )
  assert set(streams.eval_sets) == {"robot"}
  eval_batches = list(streams.eval_sets["robot"]())
  # Episode 2 alone, in order, once: its frames in batches of 2 (an odd last one dropped).
  assert len(eval_batches) == len(data["episodes"][2]["state"]) // 2
  next(streams.train)


def test_lookahead_serves_neighbouring_frames_from_one_decode(data):
  plain, ahead = frames(data["v3.0"]), frames(data["v3.0"], lookahead=HORIZON)
  for index in range(30):
    for key in ("image", "wrist_image"):
      np.testing.assert_array_equal(plain[index]["images"][key], ahead[index]["images"][key])
  # After reading frame 10 the next frames come from the kept stretch: no new seek or decode.
  decoder = ahead._decoder  # pylint: disable=protected-access
  path, start = ahead.episodes[0].videos["image"]
  ahead[10]
  stretch = decoder._decoded[path]  # pylint: disable=protected-access
  assert len(stretch) >= HORIZON
  for t in range(11, 10 + HORIZON):
    ahead[t]
    assert decoder._decoded[path] is stretch  # pylint: disable=protected-access
