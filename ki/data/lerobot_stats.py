"""Offline passes over a LeRobot dataset's numeric rows: norm stats and FAST training chunks.

Both stream the parquet files episode by episode (no video is decoded) and apply exactly the
training pipeline's action path (ki.data.robot_spec.LeRobotTransform): chunks of the model's
horizon cut within the episode and end-clamped, delta actions where data.delta_action_mask says,
then (for FAST) quantile normalisation. Frames with NaN/inf in state or chunk are left out, as the
pipeline drops them. Command lines: data_prep/lerobot_norm_stats.py, data_prep/lerobot_fit_fast.py.

Norm stats are openpi's norm_stats.json format (mean, std, q01, q99 per dim; ki.data.normalize).
A dim whose q01..q99 range is narrower than NARROW_QUANTILE_RANGE gets a warning naming it:
quantile normalisation divides by that width, so a near-constant dim (a gripper that never
moves, a padded joint) turns tiny noise into huge inputs — the openpi divergence case.
"""

from collections.abc import Iterator, Sequence
import logging

import numpy as np
import tqdm

from ki.data import droid, lerobot, normalize

NARROW_QUANTILE_RANGE = 1e-3


def episode_arrays(
  root: str,
  *,
  state_key: str,
  action_key: str,
  action_horizon: int,
  delta_action_mask: Sequence[bool] | None = None,
  max_episodes: int | None = None,
  progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Per episode: (state float32 [T, S], action chunks float32 [T, H, A]) of its finite frames,
  the chunks as deltas where `delta_action_mask` is set. Episodes shorter than the horizon are
  skipped (the pipeline drops them too)."""
  dataset = lerobot.open_dataset(root)
  source = lerobot.LeRobotFrames(
    dataset,
    cameras=(),
    state_key=state_key,
    action_key=action_key,
    action_horizon=action_horizon,
  )
  episodes = source.episodes[:max_episodes] if max_episodes else source.episodes
  for episode in tqdm.tqdm(episodes, desc=f"episodes of {root}", disable=not progress):
    if episode.length < action_horizon:
      continue
    rows = source.episode_rows(episode)
    chunks = droid.action_chunks(rows.actions, action_horizon)
    if delta_action_mask is not None and any(delta_action_mask):
      chunks = droid.to_delta_actions(chunks, rows.state, delta_action_mask)
    finite = np.isfinite(rows.state).all(axis=1) & np.isfinite(chunks).all(axis=(1, 2))
    yield rows.state[finite], chunks[finite].astype(np.float32)


def narrow_dims(
  stats: dict[str, normalize.NormStats], names: dict[str, Sequence[str] | None] | None = None
) -> list[str]:
  """'<key> dim <i> (<name>): q01..q99 = a..b' for every dim narrower than NARROW_QUANTILE_RANGE."""
  found = []
  for key, value in stats.items():
    key_names = (names or {}).get(key) or []
    for i, (low, high) in enumerate(zip(value.q01.tolist(), value.q99.tolist())):
      if high - low < NARROW_QUANTILE_RANGE:
        name = f" ({key_names[i]})" if i < len(key_names) else ""
        found.append(f"{key} dim {i}{name}: q01..q99 = {low:.6g}..{high:.6g}")
  return found


def compute_norm_stats(
  root: str,
  *,
  state_key: str,
  action_key: str,
  action_horizon: int,
  delta_action_mask: Sequence[bool] | None = None,
  max_episodes: int | None = None,
  progress: bool = True,
) -> dict[str, normalize.NormStats]:
  """{"state": NormStats [S], "actions": NormStats [A]} over every step of every chunk; logs a
  warning naming each dim with a very narrow q01..q99 range."""
  state_stats, action_stats = normalize.RunningStats(), normalize.RunningStats()
  for state, chunks in episode_arrays(
    root,
    state_key=state_key,
    action_key=action_key,
    action_horizon=action_horizon,
    delta_action_mask=delta_action_mask,
    max_episodes=max_episodes,
    progress=progress,
  ):
    if len(state):
      state_stats.update(state)
      action_stats.update(chunks.reshape(-1, chunks.shape[-1]))
  if state_stats.count < 2:
    raise ValueError(f"{root} has {state_stats.count} usable frames; statistics need at least 2")
  stats = {"state": state_stats.get_statistics(), "actions": action_stats.get_statistics()}
  features = lerobot.open_dataset(root).features
  names = {
    "state": features[state_key].get("names"),
    "actions": features[action_key].get("names"),
  }
  for line in narrow_dims(stats, {k: v if isinstance(v, list) else None for k, v in names.items()}):
    logging.warning(
      "Very narrow quantile range, normalisation will blow up noise on it: %s (%s)", line, root
    )
  return stats


def normalized_chunks(
  root: str,
  norm_stats: dict[str, normalize.NormStats],
  *,
  state_key: str,
  action_key: str,
  action_horizon: int,
  delta_action_mask: Sequence[bool] | None = None,
  max_chunks: int | None = None,
  seed: int = 0,
  progress: bool = True,
) -> np.ndarray:
  """float32 [N, H, A]: action chunks as the pipeline feeds them to FAST (delta, normalised); a
  uniform sample of `max_chunks` when there are more."""
  chunks = [
    c
    for _, c in episode_arrays(
      root,
      state_key=state_key,
      action_key=action_key,
      action_horizon=action_horizon,
      delta_action_mask=delta_action_mask,
      progress=progress,
    )
  ]
  chunks = np.concatenate(chunks) if chunks else np.zeros((0, action_horizon, 0), np.float32)
  if len(chunks) == 0:
    raise ValueError(f"{root} holds no usable action chunks to fit a tokenizer on")
  if max_chunks and len(chunks) > max_chunks:
    keep = np.sort(np.random.default_rng(seed).choice(len(chunks), max_chunks, replace=False))
    chunks = chunks[keep]
  return normalize.quantile_normalize(chunks, norm_stats["actions"]).astype(np.float32)
