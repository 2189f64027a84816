r"""Meta-World scene questions for stage 1 (a VLM that knows its scenes): images + VQA manifests.

  python -m data_prep.metaworld_questions --out=~/.cache/ki/metaworld_questions \
    --num_scenes=2000 [--seed=0] [--workers=2] [--image_size=128]

Writes OUT/images/NNNNN.jpg, OUT/train.jsonl and OUT/heldout.jsonl (lines {"image", "prompt",
"answer", "type"}, the format ki.ablation.probes.vqa_set reads) and OUT/questions_info.json, and
prints the questions per type and split with each type's majority-answer rate (what a blind model
gets by answering the commonest word) and per-prompt majority rate. The same flags give the same
bytes whatever --workers is. The library side is ki/sim/metaworld_questions.py; the Meta-World
tokenizer (data_prep.metaworld_demos assets) already covers these prompts and answers.
"""

import json
import os
import time

from absl import app, flags

from ki.sim import metaworld, metaworld_questions

_FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.time()
  out = os.path.expanduser(_FLAGS.out)
  summary = metaworld_questions.write_vlm_set(
    out,
    num_scenes=_FLAGS.num_scenes,
    seed=_FLAGS.seed,
    image_size=_FLAGS.image_size,
    workers=_FLAGS.workers,
    heldout_fraction=_FLAGS.heldout_fraction,
    tasks=metaworld.resolve_tasks(_FLAGS.tasks),
  )
  summary["seconds"] = round(time.time() - start, 1)
  by_split = summary["by_split"]
  print(f"{'type':<16} {'train':>6} {'heldout':>8} {'majority':>9} {'per prompt':>11}  answers")
  for kind, row in summary["types"].items():
    answers = " ".join(f"{word}={count}" for word, count in row["answers"].items())
    print(
      f"{kind:<16} {by_split['train'].get(kind, 0):>6} {by_split['heldout'].get(kind, 0):>8} "
      f"{row['majority_rate']:>9.3f} {row['prompt_majority_rate']:>11.3f}  {answers}"
    )
  scenes = summary["scenes"]
  print(
    f"{scenes['train']} train and {scenes['heldout']} held-out scenes, {summary['lines']} "
    f"questions in {out} ({summary['seconds']:.0f} s)"
  )
  with open(os.path.join(out, "questions_info.json"), "w") as f:
    json.dump(summary, f, indent=2)


def _define_flags() -> None:
  """Flags exist only when run as a job, so the modules import side by side (tests)."""
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_integer("num_scenes", 2000, "Rendered scenes (each has 2-4 questions).")
  flags.DEFINE_integer("seed", 0, "Scene seed; also the benchmark seed of the configurations.")
  flags.DEFINE_integer("image_size", 128, "Camera side length in pixels.")
  flags.DEFINE_integer("workers", 2, "Simulator worker processes.")
  flags.DEFINE_float(
    "heldout_fraction", metaworld_questions.HELDOUT_FRACTION, "Scenes kept for evaluation."
  )
  flags.DEFINE_string("tasks", "mt10", "mt10 or comma-separated MT10 task names.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
