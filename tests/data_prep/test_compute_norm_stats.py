"""ki.data.norm_stats.compute_norm_stats against numpy on the prepared synthetic DROID; the delta
rule."""

import numpy as np

from ki.data import droid, normalize, prepared_frames, records
from ki.data.norm_stats import compute_norm_stats


def _arrays(data_dir):
  source = prepared_frames.open_frames(str(data_dir))
  frames = [records.decode_frame(d) for d in source.__getitems__(list(range(len(source))))]
  return np.stack([f["state"] for f in frames]), np.stack([f["actions"] for f in frames])


def _check(stats: normalize.NormStats, values: np.ndarray):
  np.testing.assert_allclose(stats.mean, values.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats.std, values.std(0), rtol=1e-4, atol=1e-6)
  # Percentiles exact up to the histogram: within 2% of each dimension's range of numpy's.
  tolerance = 0.02 * (values.max(0) - values.min(0)) + 1e-6
  for q, got in ((1, stats.q01), (99, stats.q99)):
    np.testing.assert_array_less(np.abs(got - np.percentile(values, q, axis=0)), tolerance)


def test_stats_match_numpy_with_delta_actions(prepared_droid, tmp_path):
  prepared, _ = prepared_droid
  # A small read batch, so the statistics really are accumulated across batches.
  stats = compute_norm_stats(str(prepared), batch_size=64)
  state, actions = _arrays(prepared)
  _check(stats["state"], state)
  delta = actions.copy()
  delta[..., :7] -= state[:, None, :7]  # Joints relative to the state, gripper absolute.
  _check(stats["actions"], delta.reshape(-1, 8))
  path = str(tmp_path / "norm_stats.json")
  normalize.save_norm_stats(stats, path)
  loaded = normalize.load_norm_stats(path)
  np.testing.assert_array_equal(loaded["actions"].q99, stats["actions"].q99)


def test_absolute_actions_and_sampling(prepared_droid):
  prepared, manifest = prepared_droid
  absolute = compute_norm_stats(str(prepared), delta_action_mask=None)
  _, actions = _arrays(prepared)
  _check(absolute["actions"], actions.reshape(-1, 8))
  sampled = compute_norm_stats(str(prepared), max_frames=100, seed=1)
  assert manifest["num_records"] > 100
  # A sample of the same data: close, not identical.
  np.testing.assert_allclose(sampled["state"].mean, absolute["state"].mean, atol=0.1)
  assert not np.array_equal(sampled["state"].mean, absolute["state"].mean)


def test_delta_mask_parsing():
  assert prepared_frames.parse_delta_mask("1,1,1,1,1,1,1,0") == droid.DEFAULT_DELTA_ACTION_MASK
  assert prepared_frames.parse_delta_mask("none") is None
  import pytest

  with pytest.raises(ValueError, match="0/1 values"):
    prepared_frames.parse_delta_mask("1,2")
