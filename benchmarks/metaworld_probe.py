r"""Does a trained policy go where the goal (or the object) is? A probe of what it perceives.

  python -m benchmarks.metaworld_probe --checkpoint=/tmp/mw_cpu/checkpoints/4000 \
    --out=docs/metaworld/probe_goal_dependence.json

For each task, 10 initial configurations (benchmark seed 1) run closed loop for up to 200 steps
(8 per chunk). Reported: how far the hand ends from *its own* target (reach: the goal; the
others: the object) against the mean distance to the *other* configurations' targets, and the
correlation of the final hand position with the target per axis. A policy that reads the target
from the camera (or, with --state=environment_state, from the 39-D state in its prompt) ends much
closer to its own target than to the others'; one that ignores it ends about as far from both.
Episodes that succeed stop where they succeeded.
"""

import json
import os

from absl import app, flags
import numpy as np

from ki.eval import metaworld as evaluation
from ki.sim import metaworld

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Trained policy.", required=True)
_TASKS = flags.DEFINE_list("tasks", ["reach-v3", "push-v3"], "Tasks to probe.")
_CONFIGURATIONS = flags.DEFINE_integer("configurations", 10, "Initial configurations per task.")
_STATE = flags.DEFINE_enum("state", "state", ["state", "environment_state"], "Policy state.")
_OUT = flags.DEFINE_string("out", "docs/metaworld/probe_goal_dependence.json", "Output file.")


def probe(policy, task: str, configurations: int, state_kind: str = "state") -> dict:
  simulators = evaluation.Simulators(1, image_size=128, seed=1)
  finals, targets = [], []
  try:
    for k in range(configurations):
      simulators.send(0, "reset", task, k, False)
      observation = simulators.receive(0)
      state = observation.environment_state
      targets.append(state[36:39] if task.startswith("reach") else state[4:7])
      for _ in range(25):
        request = evaluation.request(observation, metaworld.INSTRUCTIONS[task], state_kind)
        chunk = policy.infer_many([request])[0]
        simulators.send(0, "act", chunk[:8])
        observation, success, _ = simulators.receive(0)
        if success:
          break
      finals.append(observation.state[:3])
  finally:
    simulators.close()
  finals, targets = np.array(finals, np.float64), np.array(targets, np.float64)
  own = np.linalg.norm(finals - targets, axis=1)
  others = [
    np.mean([np.linalg.norm(finals[i] - targets[j]) for j in range(len(targets)) if j != i])
    for i in range(len(targets))
  ]
  correlation = [
    float(np.corrcoef(finals[:, d], targets[:, d])[0, 1]) if np.std(targets[:, d]) > 1e-6 else None
    for d in range(3)
  ]
  return {
    "target": "goal" if task.startswith("reach") else "object",
    "own_target_distance": float(own.mean()),
    "other_targets_distance": float(np.mean(others)),
    "correlation_xyz": correlation,
  }


def main(argv):
  del argv
  policy = evaluation.LocalPolicy.from_checkpoint(_CHECKPOINT.value, seed=1, batch_size=1)
  results = {"checkpoint": _CHECKPOINT.value}
  for task in _TASKS.value:
    results[task] = probe(policy, task, _CONFIGURATIONS.value, _STATE.value)
    print(task, json.dumps(results[task]))
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
