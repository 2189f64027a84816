r"""The learning curve of closed-loop success: each kept checkpoint of a run, on Meta-World.

  python -m benchmarks.metaworld_curve --workdir=/tmp/mw_cpu --suite=mt10 --episodes_per_task=10 \
    [--steps=1000,2000,...] [--state=state] --out=docs/metaworld/curve

Each checkpoint is one `ki.eval.metaworld.evaluate` run (the same initial configurations for all),
skipped when <out>/step_<N>/results.json already holds one with the same settings;
writes <out>/curve.json, <out>/curve.md and <out>/curve.png (average success against steps, with
the pooled 95% Wilson interval, and one thin line per task); each run's report lands in
<out>/step_<N>/.
"""

import dataclasses
import json
import os

from absl import app, flags
from etils import epath

from ki import checkpoint as checkpoint_lib
from ki.eval import metaworld as evaluation
from ki.sim import metaworld

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_STEPS = flags.DEFINE_list("steps", [], "Checkpoint steps (default: every kept one).")
_SUITE = flags.DEFINE_string("suite", "mt10", "mt10, mt50 or task names.")
_EPISODES = flags.DEFINE_integer("episodes_per_task", 10, "Episodes per task and checkpoint.")
_STATE = flags.DEFINE_enum("state", "state", ["state", "environment_state"], "Policy state.")
_NUM_ENVS = flags.DEFINE_integer("num_envs", 4, "Simulators in lockstep.")
_OUT = flags.DEFINE_string("out", "docs/metaworld/curve", "Output folder.")


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = [r["step"] for r in rows]
  figure, axis = plt.subplots(figsize=(6, 4))
  for task in rows[0]["per_task"]:
    axis.plot(steps, [r["per_task"][task] for r in rows], color="0.8", linewidth=0.8)
  axis.plot(steps, [r["average"] for r in rows], marker="o", color="tab:blue", label="average")
  axis.fill_between(
    steps, [r["interval95"][0] for r in rows], [r["interval95"][1] for r in rows], alpha=0.2
  )
  axis.set_xlabel("training step")
  axis.set_ylabel("success rate (grey: per task)")
  axis.set_ylim(0, 1)
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _finished(folder: str, settings: evaluation.Settings) -> dict | None:
  """The summary of an evaluation already in `folder` with the same settings (the curve resumes:
  checkpoints evaluated while the run trained are not evaluated again)."""
  path = os.path.join(folder, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
  return report["summary"] if report["settings"] == wanted else None


def main(argv):
  del argv
  checkpoints = epath.Path(_WORKDIR.value) / "checkpoints"
  steps = sorted(int(s) for s in _STEPS.value) or checkpoint_lib.finished_steps(checkpoints)
  tasks = metaworld.resolve_tasks(_SUITE.value)
  rows = []
  for step in steps:
    settings = evaluation.Settings(
      tasks=tasks, episodes_per_task=_EPISODES.value, state=_STATE.value
    )
    folder = os.path.join(_OUT.value, f"step_{step}")
    summary = _finished(folder, settings)
    if summary is None:
      summary = evaluation.evaluate(
        settings, folder, checkpoint=str(checkpoints / str(step)), num_envs=_NUM_ENVS.value
      )
    rows.append(
      {
        "step": step,
        "average": summary["average"],
        "interval95": summary["interval95_pooled"],
        "per_task": {t: r["success_rate"] for t, r in summary["tasks"].items()},
      }
    )
    print(f"step {step}: {summary['average']:.3f}")
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "curve.json"), "w") as f:
    json.dump({"workdir": _WORKDIR.value, "rows": rows}, f, indent=2)
  lines = ["| step | average | 95% (pooled) |", "|---|---|---|"]
  for r in rows:
    lines.append(
      f"| {r['step']} | {r['average']:.1%} | {r['interval95'][0]:.0%}-{r['interval95'][1]:.0%} |"
    )
  with open(os.path.join(_OUT.value, "curve.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(_OUT.value, "curve.png"))


if __name__ == "__main__":
  app.run(main)
