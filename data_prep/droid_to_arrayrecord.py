r"""DROID RLDS -> ArrayRecord shards of prepared frames, for large training runs.

  python -m data_prep.droid_to_arrayrecord --rlds_dir=gs://gresearch/robotics/droid/1.0.1 \
    --out_dir=/data/droid_prepared [--keep_ranges_json=droid_keep_ranges.json] \
    [--action_space=joint_position] [--action_horizon=16] [--num_workers=16]

Each input TFRecord shard becomes one output shard `droid-train.array_record-NNNNN-of-MMMMM`,
one record per kept frame, converted in parallel worker processes; `manifest.json` records the
filter counts, the source, the settings and the shards. The conversion, its filters and its
handling of bad input: ki/data/prepare.py (`run`, which this job calls).
"""

import os

from absl import app, flags

from ki.data import droid, prepare

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  settings = prepare.Settings(
    rlds_dir=_FLAGS.rlds_dir,
    out_dir=_FLAGS.out_dir,
    action_space=_FLAGS.action_space,
    action_horizon=_FLAGS.action_horizon,
    keep_ranges_json=_FLAGS.keep_ranges_json,
  )
  prepare.run(settings, num_workers=_FLAGS.num_workers)


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string("rlds_dir", None, "DROID version folder (local or gs://).", required=True)
  flags.DEFINE_string("out_dir", None, "Local folder for the ArrayRecord shards.", required=True)
  flags.DEFINE_string("keep_ranges_json", None, "openpi's keep-ranges JSON; default: idle rule.")
  flags.DEFINE_enum("action_space", "joint_position", droid.ACTION_SPACES, "Joint action space.")
  flags.DEFINE_integer("action_horizon", 16, "Action chunk length H.")
  flags.DEFINE_integer("num_workers", max(1, (os.cpu_count() or 2) // 2), "Worker processes.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
