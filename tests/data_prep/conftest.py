"""A tiny synthetic DROID, generated once per test session and shared by the data_prep tests."""

import pytest

from ki.data.synthetic_droid import generate

# 12 episodes over 3 shards: index 5 is a failure, index 3 has no instruction, and about half
# idle at the start and/or end (ki.data.synthetic_droid.plan_episode).
NUM_EPISODES = 12
EPISODES_PER_SHARD = 4


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
  """(output folder, synthetic_info dict) of a freshly generated synthetic DROID."""
  out_dir = tmp_path_factory.mktemp("synthetic_droid")
  info = generate(
    str(out_dir),
    episodes=NUM_EPISODES,
    episodes_per_shard=EPISODES_PER_SHARD,
    vlm_images=10,
    text_vocab_size=400,
  )
  return out_dir, info


@pytest.fixture(scope="session")
def prepared_droid(synthetic_dataset, tmp_path_factory):
  """(output folder, manifest) of ki.data.prepare.run in-process on the synthetic DROID."""
  from ki.data import prepare

  out_dir, info = synthetic_dataset
  prepared = tmp_path_factory.mktemp("prepared_droid")
  settings = prepare.Settings(rlds_dir=str(out_dir / info["dataset_dir"]), out_dir=str(prepared))
  return prepared, prepare.run(settings, num_workers=1)
