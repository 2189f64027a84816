"""Streamed normalisation statistics against numpy, openpi's JSON format, (un)normalisation."""

import json

import numpy as np
import pytest

from ki.data import normalize


def _batches():
  """Batches whose range widens over time, so the histograms must be re-binned."""
  rng = np.random.default_rng(0)
  return [
    np.stack([rng.normal(i, 1 + i, 4000), rng.uniform(-i - 1, 2 * i + 1, 4000)], axis=1)
    for i in range(5)
  ]


def test_running_stats_match_numpy():
  batches = _batches()
  stats = normalize.RunningStats()
  for batch in batches:
    stats.update(batch[:, None, :])  # Leading axes are flattened ([N, H, D] action chunks).
  result = stats.get_statistics()
  data = np.concatenate(batches)
  np.testing.assert_allclose(result.mean, data.mean(0), rtol=1e-5)
  np.testing.assert_allclose(result.std, data.std(0), rtol=1e-5)
  bin_width = (data.max(0) - data.min(0)) / normalize.NUM_HISTOGRAM_BINS
  for q, got in ((1, result.q01), (99, result.q99)):
    np.testing.assert_array_less(np.abs(got - np.percentile(data, q, axis=0)), 3 * bin_width)
  # And as a rank: about 1% of the data lies below q01.
  np.testing.assert_allclose((data < result.q01).mean(0), 0.01, atol=1e-3)


def test_single_batch_quantiles_within_one_bin():
  data = np.random.default_rng(1).exponential(2.0, (20000, 3))
  stats = normalize.RunningStats()
  stats.update(data)
  result = stats.get_statistics()
  bin_width = (data.max(0) - data.min(0)) / normalize.NUM_HISTOGRAM_BINS
  np.testing.assert_array_less(np.abs(result.q99 - np.percentile(data, 99, axis=0)), bin_width)


def test_constant_dimension_gives_finite_stats():
  stats = normalize.RunningStats()
  stats.update(np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1))
  result = stats.get_statistics()
  assert result.q01[1] == pytest.approx(3.0) and result.q99[1] == pytest.approx(3.0)
  assert result.std[1] == 0.0
  np.testing.assert_array_equal(normalize.quantile_normalize(np.array([0.0, 3.0]), result)[1], -1)


def test_running_stats_reject_bad_input():
  stats = normalize.RunningStats()
  with pytest.raises(ValueError, match="non-finite"):
    stats.update(np.array([[1.0, np.inf]]))
  stats.update(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="3 dims"):
    stats.update(np.zeros((3, 3)))


def test_save_load_in_openpi_format(tmp_path):
  stats = normalize.NormStats(
    mean=np.array([0.0, 1.0]), std=np.array([1.0, 2.0]), q01=np.array([-2, -3]), q99=[2, 5]
  )
  path = str(tmp_path / "assets" / "norm_stats.json")
  normalize.save_norm_stats({"state": stats, "actions": stats}, path)
  with open(path) as f:
    raw = json.load(f)
  assert raw["norm_stats"]["state"] == {
    "mean": [0.0, 1.0],
    "std": [1.0, 2.0],
    "q01": [-2.0, -3.0],
    "q99": [2.0, 5.0],
  }
  loaded = normalize.load_norm_stats(path)
  assert set(loaded) == {"state", "actions"}
  np.testing.assert_array_equal(loaded["actions"].q99, [2.0, 5.0])
  old = {"norm_stats": {"state": {"mean": [0], "std": [1]}}}  # z-score-only stats (pi0)
  (tmp_path / "old.json").write_text(json.dumps(old))
  with pytest.raises(ValueError, match="lack \\['q01', 'q99'\\]"):
    normalize.load_norm_stats(str(tmp_path / "old.json"))
  with pytest.raises(FileNotFoundError, match="nowhere.json"):
    normalize.load_norm_stats(str(tmp_path / "nowhere.json"))


def test_quantile_and_zscore_normalisation():
  stats = normalize.NormStats(
    mean=np.array([1.0, -1.0]),
    std=np.array([2.0, 0.5]),
    q01=np.array([-1.0, 0.0]),
    q99=np.array([3.0, 10.0]),
  )
  x = np.array([[-1.0, 0.0], [3.0, 10.0], [1.0, 5.0]])
  np.testing.assert_allclose(
    normalize.quantile_normalize(x, stats), [[-1, -1], [1, 1], [0, 0]], atol=1e-5
  )
  np.testing.assert_allclose(normalize.zscore_normalize(x, stats)[2], [0.0, 12.0], atol=1e-4)
  for use_quantiles in (True, False):
    y = normalize.normalize(x, stats, use_quantiles=use_quantiles)
    assert y.dtype == np.float32
    np.testing.assert_allclose(
      normalize.unnormalize(y, stats, use_quantiles=use_quantiles), x, atol=1e-5
    )
  # Model-padded dims beyond the statistics pass through; shorter inputs use the leading stats.
  padded = np.array([3.0, 10.0, 7.0, 7.0])
  np.testing.assert_allclose(normalize.quantile_normalize(padded, stats), [1, 1, 7, 7], atol=1e-5)
  np.testing.assert_allclose(normalize.quantile_normalize(np.array([3.0]), stats), [1], atol=1e-5)
