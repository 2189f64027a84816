"""Normalisation statistics of a prepared DROID dataset, in openpi's norm_stats.json format.

Streams over the records (all, or a uniform sample of `max_frames`) and accumulates mean, std and
1st/99th percentiles of the 8-dim state and of the actions (every step of every chunk) with
ki.data.normalize.RunningStats. As in openpi, action statistics are taken after the delta
transform the training pipeline applies (ki.data.droid.to_delta_actions: masked joint dims become
relative to the current state, the gripper stays absolute); pass delta_action_mask=None for
absolute actions. The same mask must be configured in training. Command line:
data_prep/compute_norm_stats.py.
"""

from ki.data import droid, normalize, prepared_frames


def compute_norm_stats(
  data_dir: str,
  *,
  max_frames: int | None = None,
  delta_action_mask=droid.DEFAULT_DELTA_ACTION_MASK,
  seed: int = 0,
  batch_size: int = 512,
) -> dict[str, normalize.NormStats]:
  """{"state": NormStats [8], "actions": NormStats [8]} of the prepared dataset in `data_dir`."""
  source = prepared_frames.open_frames(data_dir)
  indices = prepared_frames.sample_indices(len(source), max_frames, seed)
  if len(indices) < 2:
    raise ValueError(f"{data_dir} has {len(indices)} frames; statistics need at least 2")
  state_stats, action_stats = normalize.RunningStats(), normalize.RunningStats()
  for state, actions in prepared_frames.iter_batches(source, indices, batch_size=batch_size):
    if delta_action_mask is not None:
      actions = droid.to_delta_actions(actions, state, delta_action_mask)
    state_stats.update(state)
    action_stats.update(actions)
  return {"state": state_stats.get_statistics(), "actions": action_stats.get_statistics()}
