"""Data that goes bad while training reads it: a shard overwritten or truncated under a running
pipeline gives an error naming the shard (in the trainer's process, also when a worker process read
it), or, with data.skip_unreadable_records, is skipped and counted; never a hang."""

import os

import pytest

from tests.data import pipeline_fixtures as fixtures
from tests.data import test_pipeline

FRAMES = test_pipeline.GOOD_FRAMES


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  return {"tokenizer": fixtures.tokenizer(root), "stats": fixtures.norm_stats(FRAMES)}


def _shards(tmp_path):
  folder = fixtures.write_shards(tmp_path / "shards", FRAMES, num_shards=2)
  return folder, tmp_path / "shards" / "frames.array_record-00001-of-00002"


def _overwrite(shard):
  """Another job (or a failing disk) replaces the shard's bytes: every chunk fails its hash."""
  size = shard.stat().st_size
  with open(shard, "r+b") as f:
    f.write(os.urandom(size))


def _truncate(shard):
  with open(shard, "r+b") as f:
    f.truncate(100)


@pytest.mark.parametrize("damage", [_overwrite, _truncate])
def test_shard_damaged_while_reading_is_an_error_naming_it(data, tmp_path, damage):
  folder, shard = _shards(tmp_path)
  iterator = test_pipeline.make(data, test_pipeline.config(folder))
  next(iterator)
  damage(shard)
  with pytest.raises(OSError, match=f"ArrayRecord shard {shard}.*skip_unreadable_records"):
    for _ in range(20):  # 80 examples: two epochs, so the damaged shard is read
      next(iterator)


@pytest.mark.slow  # a spawned worker process: ~5 s on an idle 2-core machine
@pytest.mark.timeout(120)
def test_worker_process_reading_a_damaged_shard_reports_it(data, tmp_path):
  folder, shard = _shards(tmp_path)
  iterator = test_pipeline.make(data, test_pipeline.config(folder, num_workers=1))
  next(iterator)
  _overwrite(shard)
  with pytest.raises(OSError, match=f"ArrayRecord shard {shard}"):
    for _ in range(20):
      next(iterator)
  iterator.close()


def test_skip_unreadable_records_skips_and_counts(data, tmp_path):
  folder, shard = _shards(tmp_path)
  iterator = test_pipeline.make(
    data, test_pipeline.config(folder, skip_unreadable_records=True), batch=4
  )
  next(iterator)
  _truncate(shard)
  for _ in range(20):
    batch = next(iterator)
    assert batch.actions.shape[0] == 4
  # Half the frames live in the damaged shard; those read after the damage were skipped.
  dropped = iterator.drop_counts["unreadable_record"]
  assert dropped >= 20, iterator.drop_counts
  assert iterator.metrics()["data/dropped/unreadable_record"] == dropped
  assert sum(iterator.drop_counts.values()) == dropped
