r"""Meta-World expert demonstrations as a LeRobot v3.0 dataset, and the assets ki trains with.

  python -m data_prep.metaworld_demos --suite=mt10 --episodes_per_task=50 \
    --out=~/.cache/ki/metaworld_mt10 [--image_size=128] [--workers=2] [--seed=0]

--suite is mt10, mt50 or comma-separated task names (reach-v3,push-v3). Only successful expert
episodes are written; failures are counted and replaced by the next initial configurations. The
same flags give the same dataset whatever --workers is. The assets (norm stats per state key,
FAST tokenizer, SentencePiece model) go to `<out>_assets` unless --noassets. The library side is
ki/sim/metaworld_demos.py. MT10 x 50 takes about 10 minutes with 2 workers on a 2-core CPU.
"""

import json
import os
import time

from absl import app, flags, logging

from ki.sim import metaworld, metaworld_demos

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  out = os.path.expanduser(_FLAGS.out)
  summary = metaworld_demos.generate(
    out,
    tasks=metaworld.resolve_tasks(_FLAGS.suite),
    episodes_per_task=_FLAGS.episodes_per_task,
    seed=_FLAGS.seed,
    image_size=_FLAGS.image_size,
    workers=_FLAGS.workers,
  )
  print(f"{'task':<28} {'kept':>5} {'failed':>7} {'mean length':>12}")
  for task, row in summary["tasks"].items():
    print(f"{task:<28} {row['kept']:>5} {row['expert_failed']:>7} {row['mean_length']:>12.1f}")
  print(f"{summary['total_frames']} frames in {out} ({time.time() - start:.0f} s)")
  with open(os.path.join(out, "meta", "ki_demos.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if _FLAGS.assets:
    assets = metaworld_demos.build_assets(out, action_horizon=_FLAGS.action_horizon)
    logging.info("assets in %s", assets)
    print(f"assets in {assets}")


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests)."""
  flags.DEFINE_string("suite", "mt10", "mt10, mt50 or comma-separated task names.")
  flags.DEFINE_integer("episodes_per_task", 50, "Successful expert episodes per task.")
  flags.DEFINE_string("out", None, "Dataset folder (must not exist or be empty).", required=True)
  flags.DEFINE_integer("seed", 0, "Benchmark seed: metaworld.MT1(task, seed) configurations.")
  flags.DEFINE_integer("image_size", 128, "Camera side length in pixels.")
  flags.DEFINE_integer("workers", 2, "Simulator worker processes.")
  flags.DEFINE_bool(
    "assets", True, "Also write norm stats, FAST and SentencePiece to <out>_assets."
  )
  flags.DEFINE_integer(
    "action_horizon", metaworld_demos.ACTION_HORIZON, "Chunk length the assets are fitted for."
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
