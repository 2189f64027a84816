"""The Grain pipeline over prepared ArrayRecord shards: batch contract, exact resume (in-process
and with worker processes, directly and through orbax), disjoint hosts, drop counts, config
validation."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ki import msgpack_numpy
from ki.batch import CAMERA_SLOTS, Batch, fake_batch
from ki.data import normalize, pipeline
from ki.tokenizers import prompt
from tests.data import pipeline_fixtures as fixtures

GOOD_FRAMES = [fixtures.frame(e, s) for e in range(4) for s in range(10)]


def bad_records() -> tuple[list[bytes], dict[str, int]]:
  """Encoded bad records and the drop counts they must produce."""
  nan_state = {**fixtures.frame(9, 0), "state": np.full(8, np.nan, np.float32)}
  corrupt = fixtures.frame(9, 1)
  corrupt["images"] = {**corrupt["images"], "wrist_image_left": b"\xff\xd8\xff broken"}
  silent = fixtures.frame(9, 2, instructions=["", "", ""])
  records = [
    msgpack_numpy.packb(nan_state),
    b"not msgpack at all",
    msgpack_numpy.packb(corrupt),
    msgpack_numpy.packb(corrupt),
    msgpack_numpy.packb(silent),
  ]
  expected = {
    "non_finite": 1,
    "bad_shape": 1,
    "corrupt_image": 2,
    "no_instruction": 1,
    "too_long": 0,
    "corrupt_video": 0,
    "missing_frame": 0,
    "short_episode": 0,
    "unreadable_record": 0,
  }
  return records, expected


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  good = fixtures.write_shards(root / "good", GOOD_FRAMES)
  records, expected = bad_records()
  # Bad records first: each lands at the start of a shard, never at the end of a worker's slice.
  mixed = fixtures.write_shards(root / "mixed", records + GOOD_FRAMES[:20], num_shards=3)
  return {
    "good": good,
    "mixed": mixed,
    "expected_drops": expected,
    "tokenizer": fixtures.tokenizer(root),
    "stats": fixtures.norm_stats(GOOD_FRAMES),
  }


MODEL = fixtures.model_config()


def config(path, **overrides):
  c = pipeline.default_config()
  c.arrayrecord_dir = str(path)
  c.update(overrides)
  return c


def make(data, c, *, batch=4, process_index=0, process_count=1, train=True, seed=7):
  return pipeline.make_iterator(
    c,
    MODEL,
    tokenizer=data["tokenizer"],
    norm_stats=data["stats"],
    split="train",
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    per_host_batch_size=batch,
    train=train,
  )


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def tags(batch, stats) -> list[int]:
  """The (episode * 1000 + step) tag each example's state carries (see fixtures.frame)."""
  state = normalize.quantile_unnormalize(batch.observation.state[:, :8], stats["state"])
  return [int(round(t)) for t in state[:, 0]]


def test_batches_follow_the_batch_contract(data):
  batch = next(make(data, config(data["good"])))
  assert isinstance(batch, Batch)
  # The model's fake batch has the same structure, shapes and dtypes.
  expected = jax.tree.map(lambda x: (x.shape, x.dtype.type), fake_batch(MODEL, 4))
  assert jax.tree.map(lambda x: (x.shape, x.dtype.type), batch) == expected
  assert batch.observation.has_actions.all()


def test_shapes_and_cameras_come_from_the_model_config(data):
  model = fixtures.model_config(
    image_size=16, action_dim=12, action_horizon=3, image_keys=CAMERA_SLOTS
  )
  iterator = pipeline.make_iterator(
    config(data["good"]),
    model,
    tokenizer=data["tokenizer"],
    norm_stats=data["stats"],
    split="train",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=2,
    train=True,
  )
  batch = next(iterator)
  expected = jax.tree.map(lambda x: (x.shape, x.dtype.type), fake_batch(model, 2))
  assert jax.tree.map(lambda x: (x.shape, x.dtype.type), batch) == expected
  # A DROID frame has no right wrist camera: that slot is black and masked out.
  masks = batch.observation.image_masks
  assert masks["base_0_rgb"].all() and masks["left_wrist_0_rgb"].all()
  assert not masks["right_wrist_0_rgb"].any()
  assert not batch.observation.images["right_wrist_0_rgb"].any()


def test_fast_postfix_only_when_the_tokenizer_has_fast(data):
  """KI/pi0-FAST prompts end in FAST tokens (ar=1, loss on); flow-only prompts carry none."""
  with_fast = next(make(data, config(data["good"])))
  with_fast = with_fast.observation
  assert with_fast.token_ar_mask.sum(axis=1).min() > 0
  np.testing.assert_array_equal(with_fast.token_ar_mask == 1, with_fast.token_loss_mask)
  tokenizer = data["tokenizer"]
  flow_only = prompt.Pi05Tokenizer(
    tokenizer.prompt_tokenizer, None, max_token_len=tokenizer.max_token_len
  )
  batch = next(make(dict(data, tokenizer=flow_only), config(data["good"]))).observation
  assert batch.token_ar_mask.sum() == 0 and batch.token_loss_mask.sum() == 0
  # The same prompt text otherwise: the prefix is identical.
  prefix_lengths = batch.tokenized_prompt_mask.sum(axis=1)
  np.testing.assert_array_equal(
    prefix_lengths,
    with_fast.tokenized_prompt_mask.sum(axis=1) - with_fast.token_ar_mask.sum(axis=1),
  )


def test_resume_in_process_gives_the_same_next_batches(data):
  c = config(data["mixed"])
  iterator = make(data, c)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  restored = make(data, c)
  restored.set_state(state)
  for batch in expected:
    assert_same(batch, next(restored))
  assert restored.drop_counts == iterator.drop_counts


def test_resume_through_orbax_with_worker_processes(data, tmp_path):
  c = config(data["mixed"], num_workers=2)
  iterator = make(data, c)
  try:
    for _ in range(3):
      next(iterator)
    manager = ocp.CheckpointManager(
      tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}
    )
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = next(iterator)
    counts = iterator.drop_counts
  finally:
    iterator.close()
  restored = make(data, c)
  try:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same(expected, next(restored))
    assert restored.drop_counts == counts
  finally:
    restored.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_record_is_counted_once(data, num_workers):
  # One pass over 5 bad + 20 good records, split between workers when there are any. Batches of
  # one keep every good example (a finite pass drops each worker's incomplete last batch).
  c = config(data["mixed"], num_workers=num_workers)
  iterator = make(data, c, batch=1, train=False)
  try:
    batches = list(iterator)
  finally:
    iterator.close()
  assert sum(len(b.observation.has_actions) for b in batches) == 20
  assert iterator.drop_counts == data["expected_drops"]
  assert iterator.metrics()["data/dropped/corrupt_image"] == 2


def test_two_hosts_read_disjoint_halves(data):
  c = config(data["good"], num_epochs=1)
  seen = []
  for host in range(2):
    iterator = make(data, c, batch=5, process_index=host, process_count=2)
    seen.append({t for batch in iterator for t in tags(batch, data["stats"])})
  assert not seen[0] & seen[1]
  assert len(seen[0]) == len(seen[1]) == 20
  assert seen[0] | seen[1] == {e * 1000 + s for e in range(4) for s in range(10)}


def test_shuffle_depends_on_seed_and_epochs_reshuffle(data):
  c = config(data["good"], augment=False)
  first = [tags(next(make(data, c, batch=10, seed=s)), data["stats"]) for s in (1, 2)]
  assert first[0] != first[1]
  iterator = make(data, c, batch=10, seed=1)
  epochs = [[t for _ in range(4) for t in tags(next(iterator), data["stats"])] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_eval_iterator_is_unaugmented_and_finite(data):
  c = config(data["good"], eval_arrayrecord_dir=data["good"])
  iterator = pipeline.make_iterator(
    c,
    MODEL,
    tokenizer=data["tokenizer"],
    norm_stats=data["stats"],
    split="eval",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=8,
    train=False,
  )
  batches = list(iterator)
  assert len(batches) == 5
  # Without augmentation the red/green exterior stays a flat colour at the image centre.
  centre = batches[0].observation.images["base_0_rgb"][:, 16, 16]
  assert np.all(
    (np.abs(centre.astype(int) - [200, 0, 0]).max(1) < 12)
    | (np.abs(centre.astype(int) - [0, 200, 0]).max(1) < 12)
  )


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"arrayrecord_dir": "/nonexistent/shards"}, "/nonexistent/shards"),
    ({"source": "parquet"}, "data.source"),
    ({"delta_action_mask": (True,) * 3}, "delta_action_mask"),
    ({"num_workers": -1}, "num_workers"),
    (
      {"vlm_sources": ({"kind": "jsonl", "path": "/nope/vlm.jsonl", "weight": 1.0},)},
      "/nope/vlm.jsonl",
    ),
    ({"vlm_sources": ({"kind": "csv", "path": "x", "weight": 1.0},)}, "vlm_sources[0].kind"),
    ({"source": "rlds", "rlds_dir": "/missing/droid/1.0.1"}, "/missing/droid/1.0.1"),
  ],
)
def test_bad_config_fails_early_naming_the_problem(data, overrides, message):
  c = config(data["good"])
  c.update(overrides)
  with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[")):
    make(data, c)


def test_unreadable_shard_is_an_error_naming_it(data, tmp_path):
  folder = tmp_path / "shards"
  fixtures.write_shards(folder, GOOD_FRAMES[:4], num_shards=2)
  bad = folder / "frames.array_record-00001-of-00002"
  bad.write_bytes(b"\x00" * 1000)
  with pytest.raises(ValueError, match=str(bad)):
    make(data, config(folder))


def test_empty_shard_folder_and_unknown_field_are_errors(data, tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    make(data, config(tmp_path))
  c = config(data["good"])
  with pytest.raises(AttributeError):
    c.shufle_window = 3  # ConfigDict from default_config() is locked against typos.


def test_data_benchmark_runs_in_quick_mode(tmp_path):
  from benchmarks import data_bench

  results = data_bench.main(["--quick", "--out_dir", str(tmp_path)])
  assert (tmp_path / "data_quick.json").exists()
  assert results["samples_per_second_one_process"] > 0
  stages = results["breakdown_ms_per_sample"]
  assert {"JPEG decode (2 cameras)", "tokenize (prompt + FAST)"} <= set(stages)
  assert all(ms > 0 for ms in stages.values())
