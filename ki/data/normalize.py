"""Normalisation statistics: streamed accumulation, openpi's norm_stats.json, (un)normalisation.

`RunningStats` sees the data in batches and keeps exact mean/std (Chan's parallel update in
float64) and a fixed-size histogram per dimension for the 1st/99th percentiles, as openpi's
`RunningStats` does: when a new batch widens a dimension's range, the histogram is re-binned onto
the wider range, so the percentiles are exact up to about one bin width of the final range.

pi0.5 uses quantile normalisation, x -> (x - q01) / (q99 - q01 + 1e-6) * 2 - 1, which maps the
1st/99th percentiles to -1/+1; z-score normalisation is kept for pi0-style configs.
"""

from collections.abc import Mapping
import dataclasses
import json
import os

import numpy as np

NUM_HISTOGRAM_BINS = 5000
# openpi's epsilon: keeps constant dimensions (e.g. padding) finite.
EPSILON = 1e-6
STATS_FIELDS = ("mean", "std", "q01", "q99")


@dataclasses.dataclass(frozen=True)
class NormStats:
  """Per-dimension statistics, each float32 [D]."""

  mean: np.ndarray
  std: np.ndarray
  q01: np.ndarray
  q99: np.ndarray

  def __post_init__(self):
    shapes = {name: np.shape(getattr(self, name)) for name in STATS_FIELDS}
    if len(set(shapes.values())) != 1 or len(shapes["mean"]) != 1:
      raise ValueError(f"NormStats fields must all be [D] vectors, got shapes {shapes}")
    for name in STATS_FIELDS:
      value = np.asarray(getattr(self, name), np.float32)
      if not np.all(np.isfinite(value)):
        raise ValueError(f"NormStats.{name} has non-finite values: {value.tolist()}")
      object.__setattr__(self, name, value)

  def to_json(self) -> dict[str, list[float]]:
    return {name: getattr(self, name).tolist() for name in STATS_FIELDS}

  @classmethod
  def from_json(cls, data: Mapping[str, list[float]], *, name: str = "stats") -> "NormStats":
    missing = [f for f in STATS_FIELDS if f not in data]
    if missing:
      raise ValueError(f"norm stats {name!r} lack {missing} (quantile normalisation needs q01/q99)")
    return cls(**{f: np.asarray(data[f], np.float32) for f in STATS_FIELDS})


def save_norm_stats(stats: Mapping[str, NormStats], path: str) -> None:
  """Writes openpi's format: {"norm_stats": {"state": {...}, "actions": {...}}}."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"norm_stats": {k: v.to_json() for k, v in stats.items()}}, f, indent=2)


def load_norm_stats(path: str) -> dict[str, NormStats]:
  """Reads openpi's norm_stats.json (local or gs://) into {"state": NormStats, "actions": ...}."""
  import tensorflow as tf  # Only for gs:// paths; keeps this module importable without TF.

  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"norm stats file not found: {path}")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"norm stats file {path} is not valid JSON: {e}") from e
  if not isinstance(data, Mapping) or not isinstance(data.get("norm_stats"), Mapping):
    raise ValueError(f"norm stats file {path} must hold {{'norm_stats': {{key: stats}}}}")
  return {k: NormStats.from_json(v, name=k) for k, v in data["norm_stats"].items()}


class RunningStats:
  """Streamed mean, std and 1st/99th percentiles of vectors, one `update` per batch."""

  def __init__(self, num_bins: int = NUM_HISTOGRAM_BINS):
    self._num_bins = num_bins
    self._count = 0
    self._mean = None  # float64 [D]
    self._sum_sq_dev = None  # float64 [D], sum of squared deviations from the mean
    self._low = None  # float64 [D], histogram range
    self._high = None
    self._histogram = None  # float64 [D, bins]

  @property
  def count(self) -> int:
    return self._count

  def update(self, batch: np.ndarray) -> None:
    """Adds a batch [..., D]; all leading axes are flattened into samples."""
    batch = np.asarray(batch, np.float64)
    if batch.ndim == 0:
      raise ValueError("RunningStats.update needs an array [..., D], got a scalar")
    batch = batch.reshape(-1, batch.shape[-1])
    if self._mean is not None and batch.shape[1] != self._mean.shape[0]:
      raise ValueError(f"batch has {batch.shape[1]} dims, earlier ones {self._mean.shape[0]}")
    if not np.all(np.isfinite(batch)):
      raise ValueError("RunningStats.update got non-finite values")
    if batch.shape[0] == 0:
      return
    self._update_moments(batch)
    self._update_histogram(batch)

  def _update_moments(self, batch: np.ndarray) -> None:
    n = batch.shape[0]
    mean = batch.mean(axis=0)
    sum_sq_dev = ((batch - mean) ** 2).sum(axis=0)
    if self._count == 0:
      self._mean, self._sum_sq_dev = mean, sum_sq_dev
    else:
      # Chan et al.'s pairwise combination: stable where E[x^2] - E[x]^2 is not.
      total = self._count + n
      delta = mean - self._mean
      self._mean = self._mean + delta * n / total
      self._sum_sq_dev = self._sum_sq_dev + sum_sq_dev + delta**2 * self._count * n / total
    self._count += n

  def _update_histogram(self, batch: np.ndarray) -> None:
    low, high = batch.min(axis=0), batch.max(axis=0)
    if self._histogram is None:
      self._low, self._high = low, high
      self._histogram = np.zeros((batch.shape[1], self._num_bins))
    elif np.any(low < self._low) or np.any(high > self._high):
      self._rebin(np.minimum(low, self._low), np.maximum(high, self._high))
    self._histogram += self._bin_counts(batch, self._low, self._high)

  def _bin_counts(self, values: np.ndarray, low: np.ndarray, high: np.ndarray, weights=None):
    """[D, bins] counts of values [N, D] on `bins` equal bins over [low, high] per dimension."""
    index = self._bin_index(values, low, high)
    flat = index + np.arange(values.shape[1]) * self._num_bins
    weights = None if weights is None else weights.ravel()
    counts = np.bincount(flat.ravel(), weights=weights, minlength=values.shape[1] * self._num_bins)
    return counts.reshape(values.shape[1], self._num_bins)

  def _bin_width(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.where(high > low, high - low, 1.0) / self._num_bins

  def _bin_index(self, values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    index = np.floor((values - low) / self._bin_width(low, high)).astype(np.int64)
    return np.clip(index, 0, self._num_bins - 1)

  def _rebin(self, low: np.ndarray, high: np.ndarray) -> None:
    """Moves the counts onto a wider range, spreading each old bin uniformly over the new bins.

    New bins are at least as wide as old ones, so an old bin overlaps at most two new bins; its
    mass is split by overlap. Errors then stay within a bin instead of drifting with every rebin.
    """
    old_width = self._bin_width(self._low, self._high)  # [D]
    starts = self._low[None, :] + np.arange(self._num_bins)[:, None] * old_width  # [bins, D]
    first = self._bin_index(starts, low, high)
    boundary = low + (first + 1) * self._bin_width(low, high)
    in_first = np.clip((boundary - starts) / old_width, 0.0, 1.0)
    mass = self._histogram.T  # [bins, D]
    second = np.minimum(first + 1, self._num_bins - 1)
    offsets = np.arange(mass.shape[1]) * self._num_bins
    size = mass.shape[1] * self._num_bins
    histogram = np.bincount((first + offsets).ravel(), (mass * in_first).ravel(), size)
    histogram += np.bincount((second + offsets).ravel(), (mass * (1 - in_first)).ravel(), size)
    self._histogram = histogram.reshape(mass.shape[1], self._num_bins)
    self._low, self._high = low, high

  def _order_statistic(self, rank: float) -> np.ndarray:
    """[D]: where the cumulative count reaches `rank` (1-based), interpolated inside its bin."""
    width = np.where(self._high > self._low, self._bin_width(self._low, self._high), 0.0)
    cumulative = np.cumsum(self._histogram, axis=1)
    index = np.array([np.searchsorted(c, rank) for c in cumulative]).clip(0, self._num_bins - 1)
    rows = np.arange(cumulative.shape[0])
    before = np.where(index > 0, cumulative[rows, index - 1], 0.0)
    in_bin = self._histogram[rows, index]
    fraction = np.where(in_bin > 0, (rank - before) / np.maximum(in_bin, 1e-12), 0.0)
    return self._low + (index + np.clip(fraction, 0.0, 1.0)) * width

  def _quantile(self, q: float) -> np.ndarray:
    """[D]: numpy's default (linear) quantile, exact up to about a bin width.

    numpy interpolates between the order statistics around position q * (n - 1) (zero-based);
    matching that definition matters in sparse tails, where neighbours lie many bins apart.
    """
    position = q * (self._count - 1)
    below = np.floor(position)
    fraction = position - below
    return (1 - fraction) * self._order_statistic(below + 1) + fraction * self._order_statistic(
      below + 2
    )

  def get_statistics(self) -> NormStats:
    if self._count < 2:
      raise ValueError(f"need at least 2 samples for statistics, have {self._count}")
    return NormStats(
      mean=self._mean,
      std=np.sqrt(self._sum_sq_dev / self._count),
      q01=self._quantile(0.01),
      q99=self._quantile(0.99),
    )


def _apply(x: np.ndarray, stats: NormStats, fn) -> np.ndarray:
  x = np.asarray(x)
  dim = min(stats.mean.shape[-1], x.shape[-1])
  head = fn(x[..., :dim].astype(np.float32), dim)
  return np.concatenate([head, x[..., dim:].astype(np.float32)], axis=-1)


def quantile_normalize(x: np.ndarray, stats: NormStats) -> np.ndarray:
  """[..., D] -> float32 [..., D]: q01 -> -1, q99 -> +1 (dims beyond the stats pass through)."""
  return _apply(
    x,
    stats,
    lambda v, d: (v - stats.q01[:d]) / (stats.q99[:d] - stats.q01[:d] + EPSILON) * 2.0 - 1.0,
  )


def quantile_unnormalize(x: np.ndarray, stats: NormStats) -> np.ndarray:
  """The inverse of `quantile_normalize`."""
  return _apply(
    x,
    stats,
    lambda v, d: (v + 1.0) / 2.0 * (stats.q99[:d] - stats.q01[:d] + EPSILON) + stats.q01[:d],
  )


def zscore_normalize(x: np.ndarray, stats: NormStats) -> np.ndarray:
  """[..., D] -> float32 [..., D]: (x - mean) / (std + 1e-6)."""
  return _apply(x, stats, lambda v, d: (v - stats.mean[:d]) / (stats.std[:d] + EPSILON))


def zscore_unnormalize(x: np.ndarray, stats: NormStats) -> np.ndarray:
  """The inverse of `zscore_normalize`."""
  return _apply(x, stats, lambda v, d: v * (stats.std[:d] + EPSILON) + stats.mean[:d])


def normalize(x: np.ndarray, stats: NormStats, *, use_quantiles: bool) -> np.ndarray:
  return quantile_normalize(x, stats) if use_quantiles else zscore_normalize(x, stats)


def unnormalize(x: np.ndarray, stats: NormStats, *, use_quantiles: bool) -> np.ndarray:
  return quantile_unnormalize(x, stats) if use_quantiles else zscore_unnormalize(x, stats)
