"""Reading a prepared dataset's frames (ArrayRecord shards of ki.data.records) in offline jobs."""

from collections.abc import Iterator, Sequence

from array_record.python import array_record_data_source
import numpy as np

from ki.data import droid, records


def open_frames(data_dir: str) -> array_record_data_source.ArrayRecordDataSource:
  """Random access to every record of the prepared dataset in `data_dir` (shards per manifest)."""
  return array_record_data_source.ArrayRecordDataSource(records.shard_paths(data_dir))


def sample_indices(total: int, limit: int | None, seed: int) -> np.ndarray:
  """All record indices in order, or `limit` of them drawn uniformly without replacement (sorted,
  so reads stay sequential within each shard)."""
  if limit is None or limit >= total:
    return np.arange(total)
  return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def iter_batches(
  source, indices: Sequence[int], *, batch_size: int = 512
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (state float32 [B, 8], actions float32 [B, H, 8]) of the records at `indices`."""
  for start in range(0, len(indices), batch_size):
    batch = [int(i) for i in indices[start : start + batch_size]]
    frames = [records.decode_frame(data) for data in source.__getitems__(batch)]
    yield (
      np.stack([f["state"] for f in frames]),
      np.stack([f["actions"] for f in frames]),
    )


def parse_delta_mask(text: str) -> tuple[bool, ...] | None:
  """'1,1,1,1,1,1,1,0' -> a mask over action dims; 'none' -> None (absolute actions)."""
  text = text.strip().lower()
  if text in ("none", ""):
    return None
  parts = [p.strip() for p in text.split(",")]
  if any(p not in ("0", "1", "true", "false") for p in parts) or len(parts) > droid.ACTION_DIM:
    raise ValueError(
      f"delta action mask must be up to {droid.ACTION_DIM} comma-separated 0/1 values or 'none', "
      f"got {text!r}"
    )
  return tuple(p in ("1", "true") for p in parts)


DEFAULT_DELTA_MASK_TEXT = ",".join("1" if m else "0" for m in droid.DEFAULT_DELTA_ACTION_MASK)
