r"""Synthetic DROID: a real TFDS RLDS dataset with DROID's exact spec, and learnable content.

  python -m data_prep.make_synthetic_droid --out_dir=/tmp/synthetic_droid --episodes=50

writes the RLDS dataset, the VLM question/answer set, the text corpus and a SentencePiece model
into --out_dir; what each file holds and how the episodes are made: ki/data/synthetic_droid.py
(`generate`, which this job calls). The same arguments give a byte-identical dataset.
"""

import json

from absl import app, flags, logging

from ki.data import synthetic_droid

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  info = synthetic_droid.generate(
    _FLAGS.out_dir,
    episodes=_FLAGS.episodes,
    seed=_FLAGS.seed,
    episodes_per_shard=_FLAGS.episodes_per_shard,
    vlm_images=_FLAGS.vlm_images,
    text_vocab_size=_FLAGS.text_vocab_size,
  )
  logging.info("wrote %s: %s", _FLAGS.out_dir, json.dumps(info))


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests, pipelines)."""
  flags.DEFINE_string("out_dir", None, "Output folder.", required=True)
  flags.DEFINE_integer("episodes", 50, "Number of robot episodes.")
  flags.DEFINE_integer("seed", 0, "Random seed; the same arguments give the same bytes.")
  flags.DEFINE_integer("episodes_per_shard", 8, "Episodes per TFRecord shard (sets shard count).")
  flags.DEFINE_integer("vlm_images", 200, "Number of VLM co-training images (3 questions each).")
  flags.DEFINE_integer("text_vocab_size", 1024, "Text pieces of the SentencePiece model.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
