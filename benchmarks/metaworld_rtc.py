r"""Success under inference delay on Meta-World: synchronous, naive asynchronous and real-time
chunking (RTC) execution of a trained policy, d = 0..4 control steps of delay.

  python -m benchmarks.metaworld_rtc --checkpoint=/tmp/mw_cpu --suite=mt10 \
    --episodes_per_task=10 --delays=0,1,2,3,4 --out=docs/metaworld/rtc

Each (strategy, delay) is one `ki.eval.metaworld.evaluate` run on the same initial configurations
(ki/eval/metaworld.py explains the three strategies). At d = 0 the three are the same execution,
so it runs once. Writes <out>/rtc.json, <out>/rtc.md (success per strategy and delay, with 95%
Wilson intervals pooled over the tasks' episodes) and <out>/rtc.png; each run's own report lands
in <out>/<strategy>_d<delay>/.
"""

import json
import os

from absl import app, flags

from ki.eval import metaworld as evaluation
from ki.sim import metaworld

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Trained policy.", required=True)
_SUITE = flags.DEFINE_string("suite", "mt10", "mt10, mt50 or task names.")
_EPISODES = flags.DEFINE_integer("episodes_per_task", 10, "Episodes per task and setting.")
_DELAYS = flags.DEFINE_list("delays", ["0", "1", "2", "3", "4"], "Delays in control steps.")
_EXECUTE = flags.DEFINE_integer("execute_steps", 8, "Steps executed per chunk.")
_STATE = flags.DEFINE_enum("state", "state", ["state", "environment_state"], "Policy state.")
_NUM_ENVS = flags.DEFINE_integer("num_envs", 4, "Simulators in lockstep.")
_OUT = flags.DEFINE_string("out", "docs/metaworld/rtc", "Output folder.")


def table(rows: list[dict]) -> str:
  delays = sorted({row["delay"] for row in rows})
  lines = [
    "| strategy | " + " | ".join(f"d={d}" for d in delays) + " |",
    "|---|" + "---|" * len(delays),
  ]
  for strategy in evaluation.STRATEGIES:
    cells = []
    for d in delays:
      match = [r for r in rows if r["delay"] == d and r["strategy"] in (strategy, "any")]
      if not match:
        cells.append("-")
        continue
      row = match[0]
      low, high = row["interval95"]
      cells.append(f"{row['success']:.1%} ({low:.0%}-{high:.0%})")
    lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axis = plt.subplots(figsize=(5, 3.5))
  for strategy in evaluation.STRATEGIES:
    points = sorted(
      (r["delay"], r["success"], *r["interval95"])
      for r in rows
      if r["strategy"] in (strategy, "any")
    )
    delays, rates, lows, highs = (list(x) for x in zip(*points))
    axis.plot(delays, rates, marker="o", label=strategy)
    axis.fill_between(delays, lows, highs, alpha=0.15)
  axis.set_xlabel("inference delay d (control steps at 80 Hz)")
  axis.set_ylabel("MT10 success (pooled, 95% Wilson)")
  axis.set_ylim(0, 1)
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def main(argv):
  del argv
  tasks = metaworld.resolve_tasks(_SUITE.value)
  rows = []
  for delay in sorted(int(d) for d in _DELAYS.value):
    for strategy in evaluation.STRATEGIES if delay else ("sync",):
      settings = evaluation.Settings(
        tasks=tasks,
        episodes_per_task=_EPISODES.value,
        execute_steps=_EXECUTE.value,
        delay=delay,
        strategy=strategy,
        state=_STATE.value,
        videos_per_outcome=0,
      )
      summary = evaluation.evaluate(
        settings,
        os.path.join(_OUT.value, f"{strategy}_d{delay}"),
        checkpoint=_CHECKPOINT.value,
        num_envs=_NUM_ENVS.value,
      )
      rows.append(
        {
          "strategy": strategy if delay else "any",
          "delay": delay,
          "success": summary["successes"] / summary["episodes"],
          "interval95": summary["interval95_pooled"],
          "average_over_tasks": summary["average"],
          "per_task": {t: r["success_rate"] for t, r in summary["tasks"].items()},
        }
      )
      print(f"{strategy} d={delay}: {rows[-1]['success']:.3f}")
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "rtc.json"), "w") as f:
    json.dump({"checkpoint": _CHECKPOINT.value, "rows": rows}, f, indent=2)
  with open(os.path.join(_OUT.value, "rtc.md"), "w") as f:
    f.write(table(rows))
  plot(rows, os.path.join(_OUT.value, "rtc.png"))
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
