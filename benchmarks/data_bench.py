"""Training-pipeline throughput on synthetic DROID, per worker process, and where the time goes.

  python -m benchmarks.data_bench [--quick] [--out_dir benchmarks/results]

Writes <out_dir>/data.json (data_quick.json with --quick) and prints a markdown table.

Builds everything the way a user would, with nothing downloaded: synthetic DROID
(data_prep.make_synthetic_droid: 180x320 JPEG cameras), the prepared ArrayRecord shards
(data_prep.droid_to_arrayrecord), norm stats (data_prep.compute_norm_stats, delta joints) and a
FAST tokenizer fitted on the normalised chunks (data_prep.fit_fast_tokenizer), with the synthetic
SentencePiece model. Then it measures:

  * pipeline samples/s in ONE process (num_workers=0, no read threads): the rate one Grain worker
    process sustains, i.e. per CPU core — record read + msgpack decode, camera and instruction
    choice, JPEG decode, resize with padding to 224x224, pi0.5 augmentation, delta + quantile
    normalisation, pi0.5 prompt + FAST tokens, batching;
  * the same pipeline with worker processes (num_workers = CPU cores) unless --quick;
  * a per-sample breakdown by stage, timing each stage's own function on the same records.

The target is >= 100 samples/s per core: 8 GPUs at openpi's ~18.5 samples/s each need ~150
samples/s, i.e. two worker processes.
"""

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks import results_writer

H = 16  # openpi's pi0.5 DROID action horizon.
ACTION_DIM = 32
IMAGE_SIZE = 224
MAX_TOKEN_LEN = 200


def _prepare(directory: str, *, episodes: int) -> dict:
  """Synthetic DROID -> ArrayRecord shards, norm stats and tokenizers, as data_prep makes them."""
  from ki.data import prepare, prepared_frames, synthetic_droid
  from ki.data.norm_stats import compute_norm_stats
  from ki.tokenizers import fast_fit, prompt

  start = time.perf_counter()
  info = synthetic_droid.generate(
    directory, episodes=episodes, episodes_per_shard=4, vlm_images=10, text_vocab_size=1024
  )
  prepared = os.path.join(directory, "prepared")
  prepare.run(
    prepare.Settings(
      rlds_dir=os.path.join(directory, info["dataset_dir"]), out_dir=prepared, action_horizon=H
    )
  )
  norm_stats = compute_norm_stats(prepared)
  chunks = prepared_frames.normalized_chunks(prepared, norm_stats, max_chunks=None)
  fast_tokenizer, _ = fast_fit.fit(chunks, vocab_size=512, scale=10.0)
  prompt_tokenizer = prompt.PromptTokenizer(os.path.join(directory, info["sentencepiece_model"]))
  return {
    "prepared": prepared,
    "norm_stats": norm_stats,
    "tokenizer": prompt.Pi05Tokenizer(
      prompt_tokenizer, fast_tokenizer, max_token_len=MAX_TOKEN_LEN
    ),
    "prepare_seconds": time.perf_counter() - start,
  }


def _config(prepared: str, *, num_workers: int):
  from ki.data import pipeline

  config = pipeline.default_config()
  config.arrayrecord_dir = prepared
  config.num_workers = num_workers
  config.read_threads = 0  # Everything on the calling thread: the per-process rate.
  return config


def _pipeline_rate(setup: dict, *, num_workers: int, batch_size: int, batches: int) -> float:
  """Samples/s of make_iterator's batches after the first (warm-up, worker start-up) batch."""
  from ki.data import pipeline
  from ki.model import pi05

  model = pi05.Config(
    action_dim=ACTION_DIM, action_horizon=H, image_size=IMAGE_SIZE, max_token_len=MAX_TOKEN_LEN
  )
  iterator = pipeline.make_iterator(
    _config(setup["prepared"], num_workers=num_workers),
    model,
    tokenizer=setup["tokenizer"],
    norm_stats=setup["norm_stats"],
    split="train",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=batch_size,
    train=True,
  )
  try:
    for _ in range(2 if num_workers else 1):  # Workers start and fill their buffers.
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    iterator.close()


def _breakdown(setup: dict, *, samples: int) -> dict[str, float]:
  """Milliseconds per sample in each stage, each timed on its own over the same records."""
  import grain

  from ki.data import droid, images, normalize, records, sources, transforms

  source = grain.sources.ArrayRecordDataSource(sources.find_arrayrecord_files(setup["prepared"]))
  raw = [source[i % len(source)] for i in range(samples)]  # The undecoded bytes.
  rng = np.random.default_rng(0)
  stages = {}

  def timed(name, function, items):
    start = time.perf_counter()
    outputs = [function(item) for item in items]
    stages[name] = 1000 * (time.perf_counter() - start) / samples
    return outputs

  frames = timed("read + msgpack decode", records.decode_frame, raw)
  cameras = [
    (f["images"]["exterior_image_1_left"], f["images"]["wrist_image_left"]) for f in frames
  ]
  decoded = timed("JPEG decode (2 cameras)", lambda c: [images.decode_jpeg(b) for b in c], cameras)
  geometric = timed(
    "resize+crop+rotate (base, fused) + resize_with_pad (wrist)",
    lambda pair: (
      images.resize_crop_rotate(pair[0], IMAGE_SIZE, rng),
      images.resize_with_pad(pair[1], IMAGE_SIZE, IMAGE_SIZE),
    ),
    decoded,
  )
  timed(
    "colour jitter (2 cameras) + to numpy",
    lambda pair: [np.asarray(images.jitter_colour(image, rng)) for image in pair],
    geometric,
  )

  def normalise(frame):
    actions = droid.to_delta_actions(frame["actions"], frame["state"])
    return (
      normalize.quantile_normalize(frame["state"], setup["norm_stats"]["state"]),
      normalize.quantile_normalize(actions, setup["norm_stats"]["actions"]),
    )

  normalised = timed("delta + quantile normalise", normalise, frames)
  tokenizer = setup["tokenizer"]
  texts = [next((t for t in f["instructions"] if t), "") for f in frames]
  timed(
    "tokenize (prompt + FAST)",
    lambda item: tokenizer.tokenize_robot(item[0], *item[1]),
    list(zip(texts, normalised)),
  )
  transform = transforms.RobotTransform(
    tokenizer=tokenizer,
    norm_stats=setup["norm_stats"],
    action_dim=ACTION_DIM,
    action_horizon=H,
    delta_action_mask=droid.DEFAULT_DELTA_ACTION_MASK,
    augment=True,
    image_size=IMAGE_SIZE,
  )
  timed("whole RobotTransform", lambda f: transform(f, rng), frames)
  return stages


def run(quick: bool) -> dict:
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="ki_data_bench_") as directory:
    setup = _prepare(directory, episodes=4 if quick else 24)
    batch_size = 8 if quick else 32
    batches = 3 if quick else 25
    in_process = _pipeline_rate(setup, num_workers=0, batch_size=batch_size, batches=batches)
    cores = os.cpu_count() or 1
    with_workers = None
    if not quick:
      with_workers = _pipeline_rate(
        setup, num_workers=cores, batch_size=batch_size, batches=batches
      )
    breakdown = _breakdown(setup, samples=32 if quick else 256)
  return {
    "cpu": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
    "note": "wall-clock; a load average above the core count means other jobs shared the CPU",
    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    "image_size": IMAGE_SIZE,
    "action_horizon": H,
    "max_token_len": MAX_TOKEN_LEN,
    "batch_size": batch_size,
    "batches_timed": batches,
    "prepare_seconds": setup["prepare_seconds"],
    "samples_per_second_one_process": in_process,
    "workers": cores,
    "samples_per_second_with_workers": with_workers,
    "target_samples_per_second_per_core": 100.0,
    "breakdown_ms_per_sample": breakdown,
  }


def markdown(results: dict) -> str:
  lines = [
    f"Data pipeline on {results['cpu']} (224x224, H={results['action_horizon']}, "
    f"batch {results['batch_size']})",
    "",
    "| measure | value |",
    "|---|---|",
    f"| pipeline, one process (per core) | {results['samples_per_second_one_process']:.0f} "
    "samples/s |",
  ]
  if results["samples_per_second_with_workers"] is not None:
    lines.append(
      f"| pipeline, {results['workers']} worker processes | "
      f"{results['samples_per_second_with_workers']:.0f} samples/s |"
    )
  for stage, ms in results["breakdown_ms_per_sample"].items():
    lines.append(f"| {stage} | {ms:.2f} ms/sample |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny dataset, few batches")
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  results = run(args.quick)
  return results_writer.publish(
    "data", results, quick=args.quick, argv=argv, out_dir=args.out_dir, table=markdown
  )


if __name__ == "__main__":
  main()
