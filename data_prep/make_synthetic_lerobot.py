r"""Writes a synthetic LeRobot dataset (LIBERO's features, tabletop scenes) for trying the path.

  python -m data_prep.make_synthetic_lerobot --out_dir=/tmp/libero_synthetic --version=v3.0 \
    [--episodes=48] [--image_size=64] [--image_storage=video]

The writer is ki/data/synthetic_lerobot.py (`generate`): real parquet and H.264 mp4 files in the
chosen codebase version, byte-identical for the same flags.
"""

from absl import app, flags, logging

from ki.data import synthetic_lerobot

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  result = synthetic_lerobot.generate(
    _FLAGS.out_dir,
    version=_FLAGS.version,
    episodes=_FLAGS.episodes,
    seed=_FLAGS.seed,
    image_size=_FLAGS.image_size,
    image_storage=_FLAGS.image_storage,
  )
  logging.info(
    "wrote %s: %d episodes, %d frames", _FLAGS.out_dir, _FLAGS.episodes, result["total_frames"]
  )


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string("out_dir", None, "Output folder (must not exist or be empty).", required=True)
  flags.DEFINE_enum("version", "v3.0", list(synthetic_lerobot.VERSIONS), "Codebase version.")
  flags.DEFINE_integer("episodes", 48, "Number of episodes.")
  flags.DEFINE_integer("seed", 0, "Seed: the same flags give the same bytes.")
  flags.DEFINE_integer("image_size", 64, "Camera side length in pixels (even).")
  flags.DEFINE_enum("image_storage", "video", ["video", "image"], "mp4 files or PNGs in parquet.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
