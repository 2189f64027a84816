r"""Normalisation statistics of a local LeRobot dataset (v2.1 or v3.0), openpi's quantile format.

  python -m data_prep.lerobot_norm_stats --dataset=/data/libero \
    --out=assets/libero/norm_stats.json \
    --state_key=state --action_key=actions --action_horizon=10 [--delta_action_mask=none]

Streams the parquet rows (no video decode) with a progress bar: mean, std, q01, q99 of the state
and of every step of every action chunk, the chunks cut and (with a mask) made relative to the
state exactly as training does. The same keys, horizon and mask must be in the experiment's
data.robot / model / data.delta_action_mask. A dim with a very narrow q01..q99 range is logged as
a warning naming it. The computation: ki/data/lerobot_stats.py (`compute_norm_stats`).
"""

import time

from absl import app, flags, logging

from ki.data import lerobot_stats, normalize, prepared_frames

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  stats = lerobot_stats.compute_norm_stats(
    _FLAGS.dataset,
    state_key=_FLAGS.state_key,
    action_key=_FLAGS.action_key,
    action_horizon=_FLAGS.action_horizon,
    delta_action_mask=prepared_frames.parse_delta_mask(_FLAGS.delta_action_mask),
    max_episodes=_FLAGS.max_episodes,
  )
  normalize.save_norm_stats(stats, _FLAGS.out)
  logging.info("wrote %s in %.1fs", _FLAGS.out, time.time() - start)
  for key, value in stats.items():
    logging.info("%s q01 %s", key, value.q01.astype(float).round(3).tolist())
    logging.info("%s q99 %s", key, value.q99.astype(float).round(3).tolist())


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string(
    "dataset", None, "LeRobot dataset folder (has meta/info.json).", required=True
  )
  flags.DEFINE_string("out", None, "Output path of norm_stats.json.", required=True)
  flags.DEFINE_string("state_key", "state", "The state feature (data.robot.state_key).")
  flags.DEFINE_string("action_key", "actions", "The action feature (data.robot.action_key).")
  flags.DEFINE_integer("action_horizon", 10, "The model's action horizon.")
  flags.DEFINE_string(
    "delta_action_mask",
    "none",
    "Action dims relative to the state, e.g. 1,1,1,0 ('none': absolute).",
  )
  flags.DEFINE_integer("max_episodes", None, "Use only the first N episodes (else all).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
