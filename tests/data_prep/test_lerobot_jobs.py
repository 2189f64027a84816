"""The LeRobot offline jobs: norm stats (quantile format, narrow-dim warning) and FAST fitting
over a synthetic LeRobot dataset, in-process and through their command lines."""

import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ki.data import droid, lerobot_stats, normalize
from ki.data import synthetic_lerobot as synthetic
from ki.tokenizers import fast

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HORIZON = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("lerobot_jobs") / "ds")
  synthetic.generate(root, version="v3.0", episodes=3, seed=2, image_size=16)
  return root


def _expected(dataset, mask):
  """Everything the stats should see: every step of every end-clamped chunk."""
  states, chunks = [], []
  for i in range(3):
    episode = synthetic.make_episode(2, i, 16)
    c = droid.action_chunks(episode["actions"], HORIZON)
    if mask:
      c = droid.to_delta_actions(c, episode["state"], mask)
    states.append(episode["state"])
    chunks.append(c.reshape(-1, synthetic.ACTION_DIM))
  return np.concatenate(states), np.concatenate(chunks)


@pytest.mark.parametrize("mask", [None, (True, True, True, False, False, False, False)])
def test_norm_stats_cover_every_chunk_step(dataset, mask):
  stats = lerobot_stats.compute_norm_stats(
    dataset,
    state_key="state",
    action_key="actions",
    action_horizon=HORIZON,
    delta_action_mask=mask,
    progress=False,
  )
  state, actions = _expected(dataset, mask)
  np.testing.assert_allclose(stats["state"].mean, state.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["actions"].mean, actions.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["actions"].std, actions.std(0), rtol=1e-3, atol=1e-6)
  # Quantiles from the streaming histogram (order statistic, not interpolated): close to numpy.
  width = actions.max(0) - actions.min(0)
  assert np.all(np.abs(stats["actions"].q99 - np.quantile(actions, 0.99, axis=0)) <= 0.02 * width)


def test_a_narrow_dim_is_named_in_a_warning(tmp_path, caplog):
  root = str(tmp_path / "narrow")
  synthetic.generate(root, version="v2.1", episodes=2, seed=3, image_size=16)
  # State dim 6 constant (a finger that never moves).
  for name in os.listdir(os.path.join(root, "data", "chunk-000")):
    path = os.path.join(root, "data", "chunk-000", name)
    table = pq.read_table(path)
    state = [row[:6] + [0.02] + row[7:] for row in table.column("state").to_pylist()]
    index = table.schema.get_field_index("state")
    table = table.set_column(index, "state", pa.array(state, pa.list_(pa.float32())))
    pq.write_table(table, path)
  with caplog.at_level(logging.WARNING):
    stats = lerobot_stats.compute_norm_stats(
      root, state_key="state", action_key="actions", action_horizon=HORIZON, progress=False
    )
  narrow = lerobot_stats.narrow_dims(stats)
  assert narrow == [
    f"state dim 6: q01..q99 = {stats['state'].q01[6]:.6g}..{stats['state'].q99[6]:.6g}"
  ]
  assert "state dim 6 (state_6)" in caplog.text


def test_jobs_write_what_the_library_computes(dataset, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  common = ["--state_key=state", "--action_key=actions", f"--action_horizon={HORIZON}"]
  stats_path, fast_dir = tmp_path / "norm_stats.json", tmp_path / "fast"
  for module, flags in (
    ("lerobot_norm_stats", [f"--dataset={dataset}", f"--out={stats_path}"]),
    (
      "lerobot_fit_fast",
      [f"--dataset={dataset}", f"--norm_stats={stats_path}", f"--out_dir={fast_dir}"]
      + ["--vocab_size=300"],
    ),
  ):
    result = subprocess.run(
      [sys.executable, "-m", f"data_prep.{module}", *flags, *common],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  stats = normalize.load_norm_stats(str(stats_path))
  expected = lerobot_stats.compute_norm_stats(
    dataset, state_key="state", action_key="actions", action_horizon=HORIZON, progress=False
  )
  for key in ("state", "actions"):
    np.testing.assert_allclose(stats[key].q01, expected[key].q01, rtol=1e-6)
  tokenizer = fast.FastTokenizer.load(str(fast_dir))
  chunks = lerobot_stats.normalized_chunks(
    dataset,
    stats,
    state_key="state",
    action_key="actions",
    action_horizon=HORIZON,
    progress=False,
  )
  assert chunks.shape[1:] == (HORIZON, synthetic.ACTION_DIM)
  decoded, valid = tokenizer.decode(
    tokenizer.encode(chunks[:20]), time_horizon=HORIZON, action_dim=synthetic.ACTION_DIM
  )
  assert np.all(valid)
  assert np.abs(decoded - chunks[:20]).max() < 0.2
