"""LeRobot reading speed per process: video decode by timestamp and the whole pipeline, at LIBERO
and DROID resolutions, and where the time goes.

  python -m benchmarks.lerobot_bench [--quick] [--out_dir benchmarks/results]

Writes <out_dir>/lerobot.json (lerobot_quick.json with --quick) and prints a markdown table.

For each resolution (LIBERO 256x256, DROID-like 180x320; two cameras, H.264 with a keyframe every
2 frames as lerobot records) a synthetic v3.0 dataset is written (data_prep.make_synthetic_lerobot)
with norm stats and a FAST tokenizer from the offline jobs' functions. Measured in ONE process
(the rate of one Grain worker, i.e. per CPU core):

  * source, shuffled: ki.data.lerobot.LeRobotFrames items in random order (parquet rows + one
    decoded frame per camera: seek to the keyframe, decode to the timestamp);
  * source, in order, without and with a look-ahead of H frames (decode a stretch once and serve
    the next frames from it: what sequential readers such as eval get);
  * pipeline: pipeline.make_iterator batches (shuffled, augmented, 224x224, prompt + FAST tokens);
  * a per-sample breakdown: parquet load (amortised over the file), video decode per camera,
    resize/augment, normalise + tokenize.
The target is >= 100 samples/s per core, as for DROID (benchmarks/data_bench.py).
"""

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks import results_writer

H = 10  # pi05_libero's action horizon
ACTION_DIM = 32
IMAGE_SIZE = 224
MAX_TOKEN_LEN = 200
RESOLUTIONS = {"libero_256x256": (256, 256), "droid_180x320": (180, 320)}


def _prepare(directory: str, shape: tuple[int, int], *, episodes: int) -> dict:
  from ki.data import lerobot_stats, synthetic_lerobot, synthetic_scene
  from ki.tokenizers import fast_fit, prompt

  root = os.path.join(directory, "lerobot")
  synthetic_lerobot.generate(root, version="v3.0", episodes=episodes, image_size=shape)
  keys = dict(state_key="state", action_key="actions", action_horizon=H, progress=False)
  stats = lerobot_stats.compute_norm_stats(root, **keys)
  fast_tokenizer, _ = fast_fit.fit(
    lerobot_stats.normalized_chunks(root, stats, **keys), vocab_size=256, scale=10.0
  )
  texts = (
    [
      template.format(color=color, shape=kind)
      for template in synthetic_scene.INSTRUCTION_TEMPLATES
      for color in synthetic_scene.COLORS
      for kind in synthetic_scene.SHAPES
    ]
    + ["Task: ", ", State: ", ";", "Action: "]
    + [str(n) for n in range(256)]
  )
  model = prompt.build_sentencepiece_model(
    texts, os.path.join(directory, "sp.model"), text_vocab_size=400
  )
  tokenizer = prompt.Pi05Tokenizer(
    prompt.PromptTokenizer(model), fast_tokenizer, max_token_len=MAX_TOKEN_LEN
  )
  return {"root": root, "stats": stats, "tokenizer": tokenizer}


def _frames(root: str, lookahead: int = 0):
  from ki.data import lerobot

  return lerobot.LeRobotFrames(
    lerobot.open_dataset(root),
    cameras=("image", "wrist_image"),
    state_key="state",
    action_key="actions",
    action_horizon=H,
    lookahead=lookahead,
  )


def _source_rate(root: str, order: np.ndarray, lookahead: int) -> float:
  source = _frames(root, lookahead)
  source[int(order[0])]  # parquet file loads are counted in the breakdown, not here
  start = time.perf_counter()
  for index in order:
    source[int(index)]
  return len(order) / (time.perf_counter() - start)


def _pipeline_rate(setup: dict, *, batch_size: int, batches: int) -> float:
  from ki.data import pipeline
  from ki.model import pi05

  config = pipeline.default_config()
  config.source = "lerobot"
  config.lerobot_dir = setup["root"]
  config.delta_action_mask = ()
  config.read_threads = 0  # everything on the calling thread: the per-process rate
  model = pi05.Config(
    action_dim=ACTION_DIM,
    action_horizon=H,
    data_action_dim=7,
    image_size=IMAGE_SIZE,
    max_token_len=MAX_TOKEN_LEN,
  )
  iterator = pipeline.make_iterator(
    config,
    model,
    tokenizer=setup["tokenizer"],
    norm_stats=setup["stats"],
    split="train",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=batch_size,
    train=True,
  )
  try:
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    iterator.close()


def _breakdown(setup: dict, order: np.ndarray) -> dict[str, float]:
  """Milliseconds per sample in each stage, each timed on its own."""
  from ki.data import normalize, robot_spec

  source = _frames(setup["root"])
  stages = {}
  start = time.perf_counter()
  for episode in source.episodes:
    source._load_file(episode.data_path)  # pylint: disable=protected-access
  stages["parquet load (all files, amortised)"] = 1000 * (time.perf_counter() - start) / len(source)
  items, rng = [], np.random.default_rng(0)
  for camera in ("image", "wrist_image"):
    decoder = source._decoder  # pylint: disable=protected-access
    start = time.perf_counter()
    for index in order:
      episode, t = source.locate(int(index))
      rows = source.episode_rows(episode)
      path, offset = episode.videos[camera]
      decoder.frame_at(path, offset + float(rows.timestamp[t]), source.tolerance)
    stages[f"video decode, {camera} (random order)"] = (
      1000 * (time.perf_counter() - start) / len(order)
    )
  items = [source[int(i)] for i in order]
  start = time.perf_counter()
  for item in items:
    for key, slot in (("image", "base_0_rgb"), ("wrist_image", "left_wrist_0_rgb")):
      robot_spec._prepare(item["images"][key], IMAGE_SIZE, rng, "wrist" not in slot)  # pylint: disable=protected-access
  stages["resize + augment (2 cameras)"] = 1000 * (time.perf_counter() - start) / len(items)
  start = time.perf_counter()
  for item in items:
    state = normalize.quantile_normalize(item["state"], setup["stats"]["state"])
    actions = normalize.quantile_normalize(item["actions"], setup["stats"]["actions"])
    setup["tokenizer"].tokenize_robot(item["prompt"], state, actions)
  stages["normalise + tokenize (prompt + FAST)"] = 1000 * (time.perf_counter() - start) / len(items)
  return stages


def run(quick: bool) -> dict:
  load_before = os.getloadavg()[0]
  rows = {}
  for name, shape in RESOLUTIONS.items():
    with tempfile.TemporaryDirectory(prefix="ki_lerobot_bench_") as directory:
      start = time.perf_counter()
      setup = _prepare(directory, shape, episodes=2 if quick else 12)
      prepare_seconds = time.perf_counter() - start
      total = len(_frames(setup["root"]))
      samples = min(total, 32 if quick else 400)
      shuffled = np.random.default_rng(0).permutation(total)[:samples]
      in_order = np.arange(samples)
      rows[name] = {
        "frames": total,
        "prepare_seconds": prepare_seconds,
        "source_shuffled_samples_per_second": _source_rate(setup["root"], shuffled, 0),
        "source_in_order_samples_per_second": _source_rate(setup["root"], in_order, 0),
        "source_in_order_lookahead_samples_per_second": _source_rate(setup["root"], in_order, H),
        "pipeline_samples_per_second": _pipeline_rate(
          setup, batch_size=8 if quick else 32, batches=2 if quick else 10
        ),
        "breakdown_ms_per_sample": _breakdown(setup, shuffled),
      }
  return {
    "cpu": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
    "note": "one process; wall-clock; a load average above the core count means a shared CPU",
    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    "codec": "h264 yuv420p, keyframe every 2 frames (lerobot's g=2), 2 cameras",
    "image_size": IMAGE_SIZE,
    "action_horizon": H,
    "target_samples_per_second_per_core": 100.0,
    "resolutions": rows,
  }


def markdown(results: dict) -> str:
  names = list(results["resolutions"])
  lines = [
    f"LeRobot reading on {results['cpu']}, one process ({results['codec']})",
    "",
    "| measure | " + " | ".join(names) + " |",
    "|---|" + "---|" * len(names),
  ]
  measures = [
    ("source, shuffled (samples/s)", "source_shuffled_samples_per_second"),
    ("source, in order (samples/s)", "source_in_order_samples_per_second"),
    (
      f"source, in order, look-ahead {H} (samples/s)",
      "source_in_order_lookahead_samples_per_second",
    ),
    ("pipeline, shuffled + augmented + tokens (samples/s)", "pipeline_samples_per_second"),
  ]
  for label, key in measures:
    lines.append(
      f"| {label} | " + " | ".join(f"{results['resolutions'][n][key]:.0f}" for n in names) + " |"
    )
  for stage in results["resolutions"][names[0]]["breakdown_ms_per_sample"]:
    values = [results["resolutions"][n]["breakdown_ms_per_sample"][stage] for n in names]
    lines.append(f"| {stage} (ms/sample) | " + " | ".join(f"{v:.2f}" for v in values) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny datasets, few samples")
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  return results_writer.publish(
    "lerobot", run(args.quick), quick=args.quick, argv=argv, out_dir=args.out_dir, table=markdown
  )


if __name__ == "__main__":
  main()
