r"""Real-time chunking in closed loop: a simulated robot executing a trained policy's chunks.

  python -m benchmarks.rtc_sim --checkpoint=/tmp/ki_demo          # after `make demo`
  python -m benchmarks.rtc_sim --checkpoint=/tmp/ki_demo --quick  # 2 episodes, one delay

The robot: synthetic DROID's arm (ki/data/synthetic_scene.py) under perfect joint-position
control (the executed action is the next state). Each control step its two cameras are rendered
from where the robot *is* (the end-effector position is recovered from the joints by least
squares on the scene's joint map), so the loop is closed through images and state. Episodes are
synthetic DROID's (seed 0, the successful ones with an instruction, from the smoke policy's own
training set: tracking error measures execution, not generalisation).

Chunks of H actions; a new observation every `s` steps (the execution horizon); its chunk arrives
`d` steps later (the inference delay, simulated: the policy itself runs between control steps).
Strategies, all with the same inference budget (one chunk every s steps):
  sync       the robot holds still for the d steps of inference, then executes the chunk from 0;
  naive      the robot keeps executing the old chunk, then switches to the new one at index d;
  ensemble   temporal ensembling (ACT, Zhao et al. 2023): each step executes the average of every
             arrived chunk's action for that step, weights exp(-0.01 i), i = 0 for the oldest;
  rtc        naive's timing, the new chunk generated with the RTC keys (previous chunk, s, d).
Metrics, joints only (radians), over every episode:
  jump       |a_t - a_{t-1}| at the steps where a new chunk takes over (max and mean); the
             typical step |a_t - a_{t-1}| over all steps is shown beside it;
  tracking   mean |q_t - q*_t| against the demonstration at the same time step;
  path       mean distance from q_t to the nearest point of the demonstrated path (ignores the
             time sync loses by holding still).
Latency: Policy.infer (plain and RTC) and the jitted samplers alone, median of `--repeats`; the
RTC overhead per Euler step = (rtc - plain) / num_flow_steps.

Writes benchmarks/results/rtc_sim.json (rtc_sim_quick.json with --quick) and docs/rtc/rtc_sim.png.
"""

import argparse
import functools
import os
import time
from typing import Any

import jax
import numpy as np
from scipy import optimize

from benchmarks import results_writer
from ki.data import synthetic_droid, synthetic_scene
from ki.model import pi05
from ki.serve import observation as observation_lib
from ki.serve import policy as policy_lib

STRATEGIES = ("sync", "naive", "ensemble", "rtc")
ENSEMBLE_DECAY = 0.01  # ACT's m
# Where the renderer can draw the gripper (table coordinates in [0, 1], height above the table):
# a policy that drives the arm off the table is shown at the nearest drawable point.
WORKSPACE = (np.array([0.0, 0.0, 0.01]), np.array([1.0, 1.0, 0.6]))
PLOT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs/rtc")


def episodes(count: int, seed: int = 0, first: int = 0) -> list[synthetic_droid.EpisodePlan]:
  """The first `count` successful episodes with an instruction, from index `first` on."""
  plans, index = [], first
  while len(plans) < count:
    plan = synthetic_droid.plan_episode(seed, index)
    if not plan.failure and any(plan.instructions):
      plans.append(plan)
    index += 1
  return plans


def position_from_joints(joints: np.ndarray, guess: np.ndarray) -> np.ndarray:
  """The end-effector position [3] whose joint map is closest to `joints` [7]."""
  fit = optimize.least_squares(
    lambda p: synthetic_scene.joints_from_position(p) - joints,
    np.clip(guess, WORKSPACE[0], WORKSPACE[1]),
    bounds=WORKSPACE,
    xtol=1e-6,
  )
  return fit.x


class Robot:
  """Perfect joint-position control; renders its cameras where it is."""

  def __init__(self, plan: synthetic_droid.EpisodePlan):
    self.plan = plan
    self.state = np.concatenate([plan.joints[0], plan.trajectory.gripper[:1]]).astype(np.float32)
    self.position = plan.trajectory.position[0].copy()
    self.prompt = next(text for text in plan.instructions if text)

  def observation(self) -> dict[str, Any]:
    self.position = position_from_joints(self.state[:7].astype(np.float64), self.position)
    gripper = float(np.clip(self.state[7], 0.0, 1.0))
    scene = self.plan.scene
    return {
      observation_lib.EXTERIOR_IMAGE: synthetic_scene.render_exterior(
        scene, synthetic_scene.FRONT_VIEW, self.position, gripper
      ),
      observation_lib.WRIST_IMAGE: synthetic_scene.render_wrist(scene, self.position, gripper),
      observation_lib.JOINT_POSITION: self.state[:7].copy(),
      observation_lib.GRIPPER_POSITION: self.state[7:].copy(),
      observation_lib.PROMPT: self.prompt,
    }

  def execute(self, action: np.ndarray) -> None:
    self.state = np.asarray(action, np.float32).copy()


def run_episode(policy, plan, strategy: str, *, delay: int, execute_steps: int) -> dict[str, Any]:
  """One episode of len(demo) control steps; returns executed actions, states, switch steps."""
  horizon = policy.model_config.action_horizon
  robot = Robot(plan)
  length = len(plan.joints)
  chunk = policy.infer(robot.observation())["actions"]  # the first chunk: the robot starts on it
  chunk_start, index = 0, 0  # the step of the chunk's row 0, the row executed next
  arrived = [(0, chunk)]  # (start step, chunk) for temporal ensembling
  pending = None  # (arrival step, start step, chunk)
  actions, states, switches = [], [], []
  step = 0
  while step < length:
    if pending is not None and step == pending[0]:  # the chunk inferred d steps ago arrives
      _, start, new_chunk = pending
      pending = None
      chunk, chunk_start, index = new_chunk, start, step - start
      arrived.append((start, new_chunk))
      switches.append(step)
    if pending is None and step - chunk_start >= execute_steps:
      observation = robot.observation()
      if strategy == "rtc":
        observation.update(
          {
            observation_lib.RTC_PREVIOUS_ACTIONS: chunk,
            observation_lib.RTC_EXECUTED_STEPS: step - chunk_start,
            observation_lib.RTC_INFERENCE_DELAY: delay,
          }
        )
      new_chunk = policy.infer(observation)["actions"]
      if strategy == "sync":  # hold still while inferring, then start the chunk from row 0
        for _ in range(delay):
          if step >= length:
            break
          actions.append(robot.state.copy())
          states.append(robot.state.copy())
          step += 1
        chunk, chunk_start, index = new_chunk, step, 0
        switches.append(step)
      else:
        pending = (step + delay, step, new_chunk)
    if step >= length:
      break
    if strategy == "ensemble":
      rows = [(c[step - s]) for s, c in arrived if 0 <= step - s < horizon]
      weights = np.exp(-ENSEMBLE_DECAY * np.arange(len(rows)))
      action = np.average(np.stack(rows), axis=0, weights=weights).astype(np.float32)
    else:
      action = chunk[min(index, horizon - 1)]
    states.append(robot.state.copy())
    robot.execute(action)
    actions.append(action)
    index += 1
    step += 1
  return {
    "actions": np.stack(actions)[:length],
    "states": np.stack(states)[:length],
    "switches": [s for s in switches if 0 < s < length],
  }


def metrics(run: dict[str, Any], demo: np.ndarray) -> dict[str, Any]:
  joints = run["actions"][:, :7]
  steps = np.linalg.norm(np.diff(joints, axis=0), axis=-1)  # steps[t - 1] = |a_t - a_{t-1}|
  jumps = [float(steps[s - 1]) for s in run["switches"]]
  states = run["states"][:, :7]
  tracking = np.linalg.norm(states - demo[: len(states)], axis=-1)
  path = np.min(np.linalg.norm(states[:, None] - demo[None], axis=-1), axis=1)
  return {
    "jumps": jumps,
    "steps": steps.tolist(),
    "tracking": tracking.tolist(),
    "path": path.tolist(),
  }


def timed(fns: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
  """Median and p90 ms of each function, called in turn `repeats` times (interleaved, so a
  shared machine's load drifts over all of them alike)."""
  for fn in fns.values():
    fn()  # compile / warm
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(1000 * (time.perf_counter() - start))
  return {
    name: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))}
    for name, t in times.items()
  }


def latency(policy, plan, *, repeats: int) -> dict[str, Any]:
  robot = Robot(plan)
  observation = robot.observation()
  previous = policy.infer(observation)["actions"]
  rtc_request = {
    **observation,
    observation_lib.RTC_PREVIOUS_ACTIONS: previous,
    observation_lib.RTC_EXECUTED_STEPS: 2,
    observation_lib.RTC_INFERENCE_DELAY: 2,
  }
  state = robot.state
  model_inputs = policy._model_inputs(
    {slot: observation[key] for slot, key in observation_lib.IMAGE_SLOTS.items()},
    state,
    robot.prompt,
  )
  chunk = policy._previous_chunk(previous[2:], 2, state)
  rng = jax.random.key(0)
  config = policy.model_config
  prefix = jax.jit(lambda params, inputs: pi05.encode_prefix(params, config, inputs)[1])
  plain_model = functools.partial(policy._sample, policy.params, model_inputs, rng)
  rtc_model = functools.partial(policy._sample_rtc, policy.params, model_inputs, rng, chunk)
  result = timed(
    {
      "infer_plain": lambda: policy.infer(observation),
      "infer_rtc": lambda: policy.infer(rtc_request),
      "sample_plain": lambda: jax.block_until_ready(plain_model()),
      "sample_rtc": lambda: jax.block_until_ready(rtc_model()),
      "prefix": lambda: jax.block_until_ready(prefix(policy.params, model_inputs)),
    },
    repeats,
  )
  result["num_flow_steps"] = policy.num_flow_steps
  steps, prefix_ms = policy.num_flow_steps, result["prefix"]["median_ms"]
  result["plain_step_ms"] = (result["sample_plain"]["median_ms"] - prefix_ms) / steps
  result["rtc_step_ms"] = (result["sample_rtc"]["median_ms"] - prefix_ms) / steps
  result["rtc_overhead_per_step_ms"] = result["rtc_step_ms"] - result["plain_step_ms"]
  return result


def summarize(per_episode: list[dict[str, Any]]) -> dict[str, float]:
  def pool(key):
    return np.concatenate([np.asarray(m[key], np.float64) for m in per_episode])

  jumps, steps = pool("jumps"), pool("steps")
  return {
    "jump_max": float(jumps.max()) if len(jumps) else 0.0,
    "jump_mean": float(jumps.mean()) if len(jumps) else 0.0,
    "step_mean": float(steps.mean()),
    "tracking_mean": float(pool("tracking").mean()),
    "path_mean": float(pool("path").mean()),
    "num_switches": int(len(jumps)),
  }


def plot(trace: dict[str, Any], table: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
  joint = trace["joint"]
  left.plot(trace["demo"][:, joint], "k--", label="demonstration", linewidth=1)
  for strategy in STRATEGIES:
    run = trace["runs"][strategy]
    (line,) = left.plot(run["actions"][:, joint], label=strategy, linewidth=1.2)
    for s in run["switches"]:
      left.plot([s], [run["actions"][s, joint]], ".", color=line.get_color(), markersize=5)
  left.set_xlabel("control step (15 Hz)")
  left.set_ylabel(f"joint {joint} command (rad)")
  left.set_title(f"one episode, d={trace['delay']}, s={trace['execute_steps']} (dots: switches)")
  left.legend(fontsize=8)
  delays = sorted(table)
  width = 0.2
  for k, strategy in enumerate(STRATEGIES):
    right.bar(
      np.arange(len(delays)) + (k - 1.5) * width,
      [table[d][strategy]["jump_mean"] for d in delays],
      width,
      label=strategy,
    )
  typical = np.mean([table[d]["rtc"]["step_mean"] for d in delays])
  right.axhline(typical, color="k", linestyle=":", linewidth=1, label="typical step (rtc)")
  right.set_xticks(np.arange(len(delays)), [f"d={d}" for d in delays])
  right.set_ylabel("mean jump at chunk switches (rad)")
  right.set_title("discontinuity at the boundary, all episodes")
  right.legend(fontsize=8)
  figure.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  figure.savefig(path, dpi=110)


def markdown(results: dict[str, Any]) -> str:
  rows = []
  for delay, by_strategy in sorted(results["table"].items(), key=lambda kv: int(kv[0])):
    for strategy in STRATEGIES:
      m = by_strategy[strategy]
      rows.append(
        [
          delay,
          strategy,
          m["jump_max"],
          m["jump_mean"],
          m["step_mean"],
          m["tracking_mean"],
          m["path_mean"],
        ]
      )
  table = results_writer.markdown_table(
    f"RTC closed loop, smoke policy, {results['num_episodes']} synthetic DROID episodes, "
    f"H={results['action_horizon']}, s={results['execute_steps']}, on {results['device']}",
    ["d", "strategy", "max jump", "mean jump", "typical step", "tracking err", "path err"],
    rows,
  )
  lat = results["latency"]
  latency_table = results_writer.markdown_table(
    f"Latency, batch 1, {lat['num_flow_steps']} Euler steps",
    ["what", "plain median ms", "RTC median ms", "RTC p90 ms"],
    [
      [
        "Policy.infer (request -> chunk)",
        lat["infer_plain"]["median_ms"],
        lat["infer_rtc"]["median_ms"],
        lat["infer_rtc"]["p90_ms"],
      ],
      [
        "jitted sampler alone",
        lat["sample_plain"]["median_ms"],
        lat["sample_rtc"]["median_ms"],
        lat["sample_rtc"]["p90_ms"],
      ],
    ],
  )
  return (
    f"{table}\n\nThe demonstrations' own typical step: {results['demo_step_mean']:.3g} rad.\n\n"
    f"{latency_table}\n\nPrefix (KV cache) alone {lat['prefix']['median_ms']:.2f} ms; per Euler "
    f"step after it: plain {lat['plain_step_ms']:.2f} ms, RTC {lat['rtc_step_ms']:.2f} ms "
    f"(overhead {lat['rtc_overhead_per_step_ms']:.2f} ms per step, "
    f"{lat['rtc_step_ms'] / lat['plain_step_ms']:.1f}x)"
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default="/tmp/ki_demo", help="workdir or step folder")
  parser.add_argument("--quick", action="store_true", help="2 episodes, d=2 only")
  parser.add_argument("--episodes", type=int, default=8)
  parser.add_argument("--delays", default="1,2,3,4")
  parser.add_argument("--execute_steps", type=int, default=4, help="s: steps between chunks")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out_dir", default=None)
  parser.add_argument("--plot", default=os.path.join(PLOT_PATH, "rtc_sim.png"))
  args = parser.parse_args(argv)
  num_episodes, delays = (2, [2]) if args.quick else (args.episodes, args.delays.split(","))
  delays = [int(d) for d in delays]
  policy = policy_lib.Policy.from_checkpoint(args.checkpoint)
  policy.warmup(rtc_too=True)
  horizon = policy.model_config.action_horizon
  for delay in delays:
    if not 0 < delay <= args.execute_steps or args.execute_steps + delay > horizon:
      raise SystemExit(f"need 0 < d <= s and s + d <= H={horizon}; got d={delay}")
  plans = episodes(num_episodes)
  table, trace = {}, None
  start = time.monotonic()
  for delay in delays:
    table[delay] = {}
    for strategy in STRATEGIES:
      per_episode, runs = [], []
      for plan in plans:
        run = run_episode(policy, plan, strategy, delay=delay, execute_steps=args.execute_steps)
        runs.append(run)
        per_episode.append(metrics(run, plan.joints))
      table[delay][strategy] = summarize(per_episode)
      if delay == delays[len(delays) // 2]:
        trace = trace or {
          "delay": delay,
          "execute_steps": args.execute_steps,
          "joint": 1,
          "demo": plans[0].joints,
          "runs": {},
        }
        trace["runs"][strategy] = runs[0]
  sim_seconds = time.monotonic() - start
  results = {
    "checkpoint": str(policy.metadata.get("checkpoint")),
    "num_episodes": num_episodes,
    "action_horizon": horizon,
    "execute_steps": args.execute_steps,
    "delays": delays,
    "max_guidance_weight": policy.rtc_max_guidance_weight,
    "schedule": policy.rtc_schedule,
    "table": table,
    "demo_step_mean": float(
      np.mean(np.concatenate([np.linalg.norm(np.diff(p.joints, axis=0), axis=-1) for p in plans]))
    ),
    "latency": latency(policy, plans[0], repeats=args.repeats),
    "sim_seconds": sim_seconds,
  }
  if not args.quick:
    plot(trace, table, args.plot)
  return results_writer.publish(
    "rtc_sim",
    results,
    quick=args.quick,
    argv=argv,
    out_dir=args.out_dir,
    table=markdown,
    module="benchmarks.rtc_sim",
  )


if __name__ == "__main__":
  main()
