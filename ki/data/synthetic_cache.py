"""Synthetic DROID for the smoke and medium experiments, generated on first use into a cache folder.

What the offline jobs of a real run do (data_prep/), in order, on a small synthetic dataset:
  ki.data.synthetic_droid.generate       RLDS episodes + VLM question/answer set +
                                            SentencePiece model (data_prep.make_synthetic_droid)
  ki.data.prepare.run                       prepared frames, ArrayRecord shards
                                            (data_prep.droid_to_arrayrecord)
  ki.data.norm_stats.compute_norm_stats     norm_stats.json (data_prep.compute_norm_stats)
  ki.tokenizers.fast_fit.fit                the FAST tokenizer folder (data_prep.fit_fast_tokenizer)
The last config.synthetic_data.eval_shards ArrayRecord shards (8 episodes each) are moved to
arrayrecord/eval as the held-out split. A READY file marks
a complete cache; a half-written one (interrupted) is rebuilt from scratch. How much data:
config.synthetic_data.{episodes, vlm_images} (experiments/droid_ki.py: SYNTHETIC_DATA).
"""

import logging
import os
import shutil

import jax
import ml_collections

READY = "READY"
EPISODES_PER_SHARD = 8
TEXT_VOCAB_SIZE = 1024  # + 1152 <loc>/<seg> pieces = the smoke model's vocab_size
FAST_VOCAB_SIZE = 256
FAST_SCALE = 10.0


def ensure(config: ml_collections.ConfigDict) -> str:
  """Builds the data in config.synthetic_data.dir unless it is already there."""
  if config.data.source == "lerobot":  # a synthetic LeRobot dataset (the LIBERO experiment)
    from ki.data import synthetic_lerobot_cache  # pylint: disable=g-import-not-at-top

    return synthetic_lerobot_cache.ensure(config)
  cache = config.synthetic_data.dir
  if os.path.exists(os.path.join(cache, READY)):
    return cache
  if jax.process_count() > 1:
    raise RuntimeError(
      f"Synthetic data is missing in {cache}; generate it with one process "
      "(python -m ki.main ... on one host) before a multi-host run."
    )
  # pylint: disable=g-import-not-at-top
  from ki.data import norm_stats, normalize, prepare, prepared_frames, synthetic_droid
  from ki.tokenizers import fast_fit
  # pylint: enable=g-import-not-at-top

  logging.info("Generating synthetic DROID into %s (first use only).", cache)
  shutil.rmtree(cache, ignore_errors=True)
  info = synthetic_droid.generate(
    cache,
    episodes=config.synthetic_data.episodes,
    seed=0,
    episodes_per_shard=EPISODES_PER_SHARD,
    vlm_images=config.synthetic_data.vlm_images,
    text_vocab_size=TEXT_VOCAB_SIZE,
  )
  train_dir = config.data.arrayrecord_dir
  prepare.run(
    prepare.Settings(
      rlds_dir=os.path.join(cache, info["dataset_dir"]),
      out_dir=train_dir,
      action_space=config.data.action_space,
      action_horizon=config.model.action_horizon,
    )
  )
  mask = tuple(config.data.delta_action_mask) or None
  stats = norm_stats.compute_norm_stats(train_dir, delta_action_mask=mask)
  normalize.save_norm_stats(stats, config.assets.norm_stats)
  chunks = prepared_frames.normalized_chunks(
    train_dir, stats, max_chunks=20_000, delta_action_mask=mask
  )
  tokenizer, report = fast_fit.fit(chunks, vocab_size=FAST_VOCAB_SIZE, scale=FAST_SCALE)
  tokenizer.save(config.assets.fast_tokenizer)
  logging.info("FAST tokenizer: %s", report)
  shutil.copy(os.path.join(cache, info["sentencepiece_model"]), config.assets.prompt_tokenizer)
  # Hold out the last shards (EPISODES_PER_SHARD episodes each).
  shards = sorted(f for f in os.listdir(train_dir) if ".array_record" in f)
  os.makedirs(config.data.eval_arrayrecord_dir, exist_ok=True)
  for shard in shards[-config.synthetic_data.eval_shards :]:
    shutil.move(os.path.join(train_dir, shard), config.data.eval_arrayrecord_dir)
  with open(os.path.join(cache, READY), "w") as f:
    f.write("complete\n")
  return cache
