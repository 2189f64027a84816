r"""Normalisation statistics of a prepared DROID dataset, in openpi's norm_stats.json format.

  python -m data_prep.compute_norm_stats --data_dir=/data/droid_prepared \
    --out=assets/droid/norm_stats.json [--max_frames=1000000] [--delta_action_mask=1,1,1,1,1,1,1,0]

Streams over the records (all, or a uniform sample of --max_frames) and accumulates mean, std and
1st/99th percentiles of the 8-dim state and of the actions (every step of every chunk) with
ki.data.normalize.RunningStats. As in openpi, action statistics are taken after the delta
transform the training pipeline applies (ki.data.droid.to_delta_actions: masked joint dims become
relative to the current state, the gripper stays absolute); pass --delta_action_mask=none for
absolute actions. The same mask must be configured in training.
"""

import time

from absl import app, flags, logging

from data_prep import prepared_frames
from ki.data import droid, normalize

_FLAGS = flags.FLAGS


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


def main(argv):
  del argv
  start = time.time()
  mask = prepared_frames.parse_delta_mask(_FLAGS.delta_action_mask)
  stats = compute_norm_stats(
    _FLAGS.data_dir, max_frames=_FLAGS.max_frames, delta_action_mask=mask, seed=_FLAGS.seed
  )
  normalize.save_norm_stats(stats, _FLAGS.out)
  logging.info("wrote %s in %.1fs (delta action mask: %s)", _FLAGS.out, time.time() - start, mask)
  for key, value in stats.items():
    logging.info("%s q01 %s", key, value.q01.astype(float).round(3).tolist())
    logging.info("%s q99 %s", key, value.q99.astype(float).round(3).tolist())


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string(
    "data_dir", None, "Prepared dataset (droid_to_arrayrecord output).", required=True
  )
  flags.DEFINE_string("out", None, "Output path of norm_stats.json.", required=True)
  flags.DEFINE_integer("max_frames", None, "Use a uniform sample of this many frames (else all).")
  flags.DEFINE_string(
    "delta_action_mask",
    prepared_frames.DEFAULT_DELTA_MASK_TEXT,
    "Action dims made relative to the state before the statistics ('none': absolute).",
  )
  flags.DEFINE_integer("seed", 0, "Seed of the frame sample.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
