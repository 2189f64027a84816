"""Synthetic LIBERO-spec LeRobot data for the LIBERO smoke/medium experiments, built on first use.

The LeRobot counterpart of ki/data/synthetic_cache.py (which dispatches here when
config.data.source is "lerobot"); the offline jobs of a real LeRobot run, in order:
  ki.data.synthetic_lerobot.generate      a v3.0 LeRobot dataset (data_prep.make_synthetic_lerobot)
  ki.data.synthetic_droid.write_vlm_set   the VLM question/answer set + a SentencePiece model
  ki.data.lerobot_stats.compute_norm_stats  norm_stats.json (data_prep.lerobot_norm_stats)
  ki.tokenizers.fast_fit.fit              the FAST tokenizer (data_prep.lerobot_fit_fast)
The held-out episodes are the dataset's last data.lerobot_eval_episodes. A READY file marks a
complete cache; a half-written one is rebuilt from scratch.
"""

import logging
import os
import shutil

import jax
import ml_collections

from ki.data import synthetic_cache

IMAGE_SIZE = 64  # stored frames (LIBERO's are 256); the smoke model reads 64, medium 112


def ensure(config: ml_collections.ConfigDict) -> str:
  """Builds the data in config.synthetic_data.dir unless it is already there."""
  cache = config.synthetic_data.dir
  if os.path.exists(os.path.join(cache, synthetic_cache.READY)):
    return cache
  if jax.process_count() > 1:
    raise RuntimeError(
      f"Synthetic data is missing in {cache}; generate it with one process before a multi-host run."
    )
  # pylint: disable=g-import-not-at-top
  from ki.data import lerobot_stats, normalize, synthetic_droid, synthetic_lerobot
  from ki.tokenizers import fast_fit, prompt
  # pylint: enable=g-import-not-at-top

  logging.info("Generating a synthetic LIBERO-spec LeRobot dataset into %s (first use).", cache)
  shutil.rmtree(cache, ignore_errors=True)
  synthetic_lerobot.generate(
    config.data.lerobot_dir,
    version="v3.0",
    episodes=config.synthetic_data.episodes,
    seed=0,
    image_size=IMAGE_SIZE,
    episodes_per_file=16,
  )
  vlm_dir = os.path.dirname(config.eval.vlm_heldout)
  synthetic_droid.write_vlm_set(vlm_dir, num_images=config.synthetic_data.vlm_images, seed=0)
  prompt.build_sentencepiece_model(
    synthetic_droid.corpus_texts(vlm_dir),
    config.assets.prompt_tokenizer,
    text_vocab_size=synthetic_cache.TEXT_VOCAB_SIZE,
  )
  robot = config.data.robot
  keys = dict(
    state_key=robot.state_key,
    action_key=robot.action_key,
    action_horizon=config.model.action_horizon,
    delta_action_mask=tuple(config.data.delta_action_mask) or None,
    progress=False,
  )
  stats = lerobot_stats.compute_norm_stats(config.data.lerobot_dir, **keys)
  normalize.save_norm_stats(stats, config.assets.norm_stats)
  chunks = lerobot_stats.normalized_chunks(
    config.data.lerobot_dir, stats, max_chunks=20_000, **keys
  )
  tokenizer, report = fast_fit.fit(
    chunks, vocab_size=synthetic_cache.FAST_VOCAB_SIZE, scale=synthetic_cache.FAST_SCALE
  )
  tokenizer.save(config.assets.fast_tokenizer)
  logging.info("FAST tokenizer: %s", report)
  with open(os.path.join(cache, synthetic_cache.READY), "w") as f:
    f.write("complete\n")
  return cache
