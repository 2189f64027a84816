"""Reading a prepared dataset's frames (ArrayRecord shards of ki.data.records) in offline jobs:
norm statistics (ki.data.norm_stats), FAST fitting (`normalized_chunks`), the synthetic cache."""

from collections.abc import Iterator, Sequence

from array_record.python import array_record_data_source
import numpy as np

from ki.data import droid, normalize, records


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


def normalized_chunks(
  data_dir: str,
  norm_stats: dict[str, normalize.NormStats],
  *,
  max_chunks: int | None,
  delta_action_mask=droid.DEFAULT_DELTA_ACTION_MASK,
  seed: int = 0,
) -> np.ndarray:
  """float32 [N, H, 8]: sampled action chunks, as deltas where masked, quantile-normalised.

  Each chunk goes through exactly the training pipeline's action path: delta actions
  (ki.data.droid.to_delta_actions, same mask as the norm statistics), then quantile normalisation
  with the dataset's norm stats (ki.data.normalize). What the FAST tokenizer is fitted on.
  """
  if "actions" not in norm_stats:
    raise ValueError(f"norm stats have no 'actions' entry (keys: {sorted(norm_stats)})")
  source = open_frames(data_dir)
  indices = sample_indices(len(source), max_chunks, seed)
  if len(indices) == 0:
    raise ValueError(f"{data_dir} holds no frames to fit a tokenizer on")
  chunks = []
  for state, actions in iter_batches(source, indices):
    if delta_action_mask is not None:
      actions = droid.to_delta_actions(actions, state, delta_action_mask)
    chunks.append(normalize.quantile_normalize(actions, norm_stats["actions"]))
  return np.concatenate(chunks)
