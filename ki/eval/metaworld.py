r"""Closed-loop success of a policy on Meta-World, comparable with published tables.

  python -m ki.eval.metaworld --checkpoint=/tmp/mw_cpu --suite=mt10 --episodes_per_task=50 \
    [--out=DIR] [--execute_steps=8] [--num_envs=4] [--workers=2] [--seed=1]
  python -m ki.eval.metaworld --server=ws://gpu-host:8000 --suite=mt10   # a running ki.serve
  python -m ki.eval.metaworld --baseline=expert|constant|nearest_demo --suite=mt10

Episode k of a task starts from the benchmark's own configuration k % 50 of `metaworld.MT1(task,
seed)` (the demonstrations use seed 0, so the default evaluation seed 1 gives initial
configurations the policy has not seen). Each chunk the policy returns is executed for
`execute_steps` steps before it is asked again; an episode stops at its first success or at
`max_steps` (LeRobot's 400). With `--delay=d` the policy's answer arrives d control steps after
the observation it was asked about, executed as `--strategy`:
  sync   the robot holds still (zero motion, gripper as it was) for d steps, then runs the chunk;
  naive  the robot keeps executing the previous chunk for d steps, then switches to the new one at
         its row d (asynchronous execution without guidance);
  rtc    as naive, but the new chunk is sampled by real-time chunking (ki/model/rtc.py), guided to
         continue the previous one; its first d rows are the previous chunk's.
Several environments run in worker processes in lockstep and the policy answers all of them in
one batched call (`Policy.infer_batch`); RTC requests go one at a time.

Writes into --out: results.json (per task: episodes, successes, rate, 95% Wilson interval, mean
steps to success; the average; MT50's difficulty groups), results.md (the table), success.png (a
bar chart with the intervals) and videos/*.mp4 (the first success and the first failure of each
task). The same flags and seed give the same results.
"""

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import tqdm

from ki.sim import metaworld

STRATEGIES = ("sync", "naive", "rtc")
BASELINES = ("expert", "constant", "nearest_demo")
DEFAULT_MAX_STEPS = 400  # LeRobot's Meta-World evaluation


class IncompatiblePolicyError(ValueError):
  """The checkpoint's action or state dimensions, or its cameras, do not fit Meta-World."""


@dataclasses.dataclass(frozen=True)
class Settings:
  tasks: tuple[str, ...]
  episodes_per_task: int
  seed: int = 1
  max_steps: int = DEFAULT_MAX_STEPS
  execute_steps: int = 8
  delay: int = 0
  strategy: str = "sync"
  image_size: int = 128
  state: str = "state"  # "state" (obs[:4]) or "environment_state" (39-D)
  videos_per_outcome: int = 1  # per task: this many successes and failures recorded

  def validate(self, horizon: int | None = None) -> None:
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
    if self.execute_steps < 1 or self.delay < 0 or self.delay >= self.execute_steps:
      raise ValueError(
        f"need 1 <= execute_steps and 0 <= delay < execute_steps, got execute_steps="
        f"{self.execute_steps}, delay={self.delay}"
      )
    if horizon is not None and self.execute_steps + self.delay > horizon:
      raise ValueError(
        f"execute_steps + delay = {self.execute_steps + self.delay} > the policy's horizon "
        f"{horizon}: a chunk would run out before the next one arrives"
      )
    if self.state not in ("state", "environment_state"):
      raise ValueError(f"state must be 'state' or 'environment_state', got {self.state!r}")


# ----------------------------------------------------------------------------- simulator workers


def _worker(connection, image_size: int, seed: int) -> None:
  """A simulator process: ("reset", task, configuration, record) -> observation;
  ("act", actions [k, 4]) -> runs them until success, returns (observation, success, steps);
  ("frames",) -> the recorded frames; ("close",)."""
  os.environ.setdefault("LP_NUM_THREADS", "1")
  envs: dict[str, metaworld.Env] = {}
  env = None
  frames: list[np.ndarray] = []
  record = False
  while True:
    message = connection.recv()
    kind = message[0]
    if kind == "close":
      break
    if kind == "reset":
      _, task, configuration, record = message
      if task not in envs:
        envs[task] = metaworld.Env(task, seed=seed, image_size=image_size)
      env = envs[task]
      observation = env.reset(configuration)
      frames = [observation.image] if record else []
      connection.send(observation)
    elif kind == "act":
      success = False
      for action in message[1]:
        observation, success = env.step(action)
        if record:
          frames.append(observation.image)
        if success:
          break
      connection.send((observation, success, env.steps))
    elif kind == "frames":
      connection.send(np.stack(frames) if frames else None)
  for each in envs.values():
    each.close()
  connection.close()


class Simulators:
  """`count` simulator processes driven in lockstep."""

  def __init__(self, count: int, *, image_size: int, seed: int):
    context = multiprocessing.get_context("spawn")
    self._connections, self._processes = [], []
    for _ in range(count):
      parent, child = context.Pipe()
      process = context.Process(target=_worker, args=(child, image_size, seed), daemon=True)
      process.start()
      self._connections.append(parent)
      self._processes.append(process)

  def __len__(self) -> int:
    return len(self._connections)

  def send(self, index: int, *message) -> None:
    self._connections[index].send(message)

  def receive(self, index: int):
    return self._connections[index].recv()

  def close(self) -> None:
    for connection in self._connections:
      try:
        connection.send(("close",))
      except (BrokenPipeError, OSError):
        pass
    for process in self._processes:
      process.join(timeout=10)
      if process.is_alive():
        process.kill()


# ----------------------------------------------------------------------------- policies


def request(observation: metaworld.Observation, instruction: str, state: str) -> dict[str, Any]:
  """openpi's LIBERO-format request for one Meta-World observation (one camera)."""
  vector = observation.state if state == "state" else observation.environment_state
  return {
    "observation/image": observation.image,
    "observation/state": np.asarray(vector, np.float32),
    "prompt": instruction,
  }


def check_policy(metadata: dict[str, Any], settings: Settings) -> int:
  """Refuses a policy that cannot act in Meta-World, before any episode runs; returns its
  horizon. `metadata` is what the policy server sends on connect (ki.serve.policy.Policy)."""
  problems = []
  if metadata.get("action_dim") != metaworld.ACTION_DIM:
    problems.append(
      f"it outputs {metadata.get('action_dim')}-D actions; Meta-World takes "
      f"{metaworld.ACTION_DIM} (xyz hand motion + gripper)"
    )
  state_dim = metaworld.STATE_DIM if settings.state == "state" else metaworld.ENVIRONMENT_STATE_DIM
  keys = metadata.get("observation_keys") or []
  if "observation/state" not in keys:
    problems.append(f"it expects a DROID request ({keys}), not a one-camera LIBERO-format one")
  if "observation/wrist_image" in keys:
    problems.append("it reads a wrist camera; Meta-World renders one camera")
  if metadata.get("state_dim") not in (None, state_dim):
    problems.append(
      f"it was trained on a {metadata.get('state_dim')}-D state; --state={settings.state} gives "
      f"{state_dim}-D (use --state=environment_state for 39-D, state for 4-D)"
    )
  if problems:
    raise IncompatiblePolicyError(
      "this policy does not fit Meta-World: " + "; ".join(problems) + f" (metadata: {metadata})"
    )
  horizon = int(metadata["action_horizon"])
  settings.validate(horizon)
  return horizon


class LocalPolicy:
  """A ki.serve.policy.Policy in this process: batched `infer_batch`, RTC through `infer`."""

  def __init__(self, policy, *, batch_size: int):
    self.policy = policy
    self.batch_size = batch_size
    self.metadata = policy.metadata

  @classmethod
  def from_checkpoint(cls, checkpoint: str, *, seed: int, batch_size: int) -> "LocalPolicy":
    from ki.serve import policy as policy_lib  # pylint: disable=g-import-not-at-top

    return cls(policy_lib.Policy.from_checkpoint(checkpoint, seed=seed), batch_size=batch_size)

  def infer_many(self, requests: list[dict]) -> list[np.ndarray]:
    if any(key.startswith("rtc/") for r in requests for key in r):
      return [self.policy.infer(r)["actions"] for r in requests]
    replies = self.policy.infer_batch(requests, batch_size=self.batch_size)
    return [reply["actions"] for reply in replies]

  def close(self) -> None:
    pass


class RemotePolicy:
  """A running `python -m ki.serve` (or any openpi-protocol server): one connection per env."""

  def __init__(self, url: str, *, connections: int):
    from ki.serve import client as client_lib  # pylint: disable=g-import-not-at-top

    self.clients = [client_lib.PolicyClient(url) for _ in range(connections)]
    self.metadata = dict(self.clients[0].metadata)

  def infer_many(self, requests: list[dict]) -> list[np.ndarray]:
    from concurrent import futures  # pylint: disable=g-import-not-at-top

    with futures.ThreadPoolExecutor(len(requests)) as pool:
      replies = list(pool.map(lambda pair: pair[0].infer(pair[1]), zip(self.clients, requests)))
    return [np.asarray(reply["actions"], np.float32) for reply in replies]

  def close(self) -> None:
    for client in self.clients:
      client.close()


# ----------------------------------------------------------------------------- the episode loop


@dataclasses.dataclass
class _Slot:
  task: str
  episode: int
  record: bool
  observation: Any = None
  chunk: np.ndarray | None = None  # the chunk being executed and how many of its rows have run
  executed: int = 0
  steps: int = 0
  done: bool = False
  success: bool = False


def _hold(chunk: np.ndarray | None, steps: int) -> np.ndarray:
  """Standing still: no hand motion, the gripper as last commanded."""
  gripper = -1.0 if chunk is None else float(chunk[-1, 3])
  return np.tile(np.array([0.0, 0.0, 0.0, gripper], np.float32), (steps, 1))


def _cycle_actions(slot: _Slot, new_chunk: np.ndarray, settings: Settings) -> np.ndarray:
  """What the robot executes between this request and the next one."""
  d, e = settings.delay, settings.execute_steps
  if settings.strategy == "sync" or slot.chunk is None or d == 0:
    waiting = _hold(slot.chunk, d) if d else np.zeros((0, 4), np.float32)
    return np.concatenate([waiting, new_chunk[:e]])
  # Asynchronous: the previous chunk runs on while the new one is computed, then the new one
  # takes over at its row d (for RTC those d rows equal the previous chunk's by construction).
  previous = slot.chunk[slot.executed : slot.executed + d]
  if len(previous) < d:
    previous = np.concatenate([previous, _hold(slot.chunk, d - len(previous))])
  return np.concatenate([previous, new_chunk[d:e]])


def run_policy(policy, settings: Settings, *, num_envs: int, progress: bool = True) -> dict:
  """Runs every (task, episode) with `policy` (LocalPolicy or RemotePolicy) in `num_envs`
  simulator processes; returns the per-episode records and the recorded videos."""
  metaworld.check_rendering(settings.image_size, settings.image_size)
  check_policy(policy.metadata, settings)
  queue = [(task, k) for task in settings.tasks for k in range(settings.episodes_per_task)]
  queue.reverse()
  simulators = Simulators(num_envs, image_size=settings.image_size, seed=settings.seed)
  episodes, videos = [], {}
  recorded = {(task, outcome): 0 for task in settings.tasks for outcome in (True, False)}
  slots: list[_Slot | None] = [None] * num_envs
  bar = tqdm.tqdm(total=len(queue), disable=not progress, unit="episode")
  try:
    while queue or any(slot is not None for slot in slots):
      for i in range(num_envs):  # fill free simulators
        if slots[i] is None and queue:
          task, k = queue.pop()
          want = any(recorded[(task, o)] < settings.videos_per_outcome for o in (True, False))
          slots[i] = _Slot(task, k, record=want)
          simulators.send(i, "reset", task, k, want)
      for i, slot in enumerate(slots):
        if slot is not None and slot.observation is None:
          slot.observation = simulators.receive(i)
      active = [i for i, slot in enumerate(slots) if slot is not None]
      requests = []
      for i in active:
        slot = slots[i]
        body = request(slot.observation, metaworld.INSTRUCTIONS[slot.task], settings.state)
        if settings.strategy == "rtc" and slot.chunk is not None and settings.delay:
          body["rtc/previous_actions"] = slot.chunk
          body["rtc/executed_steps"] = slot.executed
          body["rtc/inference_delay"] = settings.delay
        requests.append(body)
      chunks = policy.infer_many(requests)
      for i, chunk in zip(active, chunks):
        slot = slots[i]
        actions = _cycle_actions(slot, np.asarray(chunk, np.float32), settings)
        actions = actions[: settings.max_steps - slot.steps]
        simulators.send(i, "act", actions)
        slot.chunk, slot.executed = np.asarray(chunk, np.float32), settings.execute_steps
      for i in active:
        slot = slots[i]
        slot.observation, slot.success, slot.steps = simulators.receive(i)
        if slot.success or slot.steps >= settings.max_steps:
          episodes.append(
            dict(task=slot.task, episode=slot.episode, success=slot.success, steps=slot.steps)
          )
          key = (slot.task, slot.success)
          if slot.record and recorded[key] < settings.videos_per_outcome:
            simulators.send(i, "frames")
            name = f"{slot.task}_{'success' if slot.success else 'failure'}_{slot.episode}"
            videos[name] = simulators.receive(i)
            recorded[key] += 1
          slots[i] = None
          bar.update(1)
  finally:
    bar.close()
    simulators.close()
  episodes.sort(key=lambda e: (settings.tasks.index(e["task"]), e["episode"]))
  return {"episodes": episodes, "videos": videos}


# ----------------------------------------------------------------------------- baselines


def run_baseline(kind: str, settings: Settings, *, demos: str | None = None) -> dict:
  """Episodes without a learned policy, without rendering (none of them looks at the image):
  expert        the task's scripted expert (an upper bound; it reads object and goal positions)
  constant      the mean action of the task's demonstrations at every step
  nearest_demo  replays the demonstration whose start state (39-D) is nearest
  """
  if kind not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
  demo_sets = _demos_by_task(demos) if kind != "expert" else {}
  if kind != "expert":
    missing = [t for t in settings.tasks if t not in demo_sets]
    if missing:
      raise ValueError(f"the demonstrations in {demos} have no episodes of {missing}")
  episodes = []
  for task in settings.tasks:
    env = metaworld.Env(task, seed=settings.seed, image_size=None)
    for k in range(settings.episodes_per_task):
      observation = env.reset(k)
      if kind == "expert":
        policy = metaworld.expert(task)
        act = lambda t, obs, policy=policy: policy.get_action(obs.environment_state)  # noqa: E731
      elif kind == "constant":
        mean = np.concatenate([a for _, a in demo_sets[task]]).mean(0)
        act = lambda t, obs, mean=mean: mean  # noqa: E731
      else:
        starts = np.stack([s for s, _ in demo_sets[task]])
        nearest = int(np.argmin(np.linalg.norm(starts - observation.environment_state, axis=1)))
        actions = demo_sets[task][nearest][1]
        act = lambda t, obs, a=actions: a[min(t, len(a) - 1)]  # noqa: E731
      success = False
      for t in range(settings.max_steps):
        observation, success = env.step(act(t, observation))
        if success:
          break
      episodes.append(dict(task=task, episode=k, success=success, steps=env.steps))
    env.close()
  return {"episodes": episodes, "videos": {}}


def _demos_by_task(root: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
  """task -> [(first 39-D state, actions [T, 4])] from a demos dataset (ki.sim.metaworld_demos)."""
  # pylint: disable=g-import-not-at-top
  from ki.data import lerobot
  from ki.sim import metaworld_demos

  # pylint: enable=g-import-not-at-top
  dataset = lerobot.open_dataset(root)
  by_instruction = {text: task for task, text in metaworld.INSTRUCTIONS.items()}
  frames = lerobot.LeRobotFrames(
    dataset,
    cameras=(),
    state_key=metaworld_demos.ENVIRONMENT_STATE_KEY,
    action_key=metaworld_demos.ACTION_KEY,
    action_horizon=1,
  )
  result: dict[str, list] = {}
  for episode in dataset.episodes:
    rows = frames.episode_rows(episode)
    task = by_instruction.get(dataset.tasks[int(rows.task_index[0])])
    if task is not None:
      result.setdefault(task, []).append((rows.state[0].astype(np.float64), rows.actions))
  return result


def state_kind(state_key: str) -> str:
  """The Settings.state of a policy trained on the dataset key `state_key`."""
  return "environment_state" if state_key.endswith("environment_state") else "state"


def settings_from_config(config) -> Settings:
  """The evaluation a training run asks for in config.eval.sim (ki/train/config.py), checked:
  task names, step counts, and a model that acts in Meta-World (4-D actions, one camera)."""
  sim = config.eval.sim
  settings = Settings(
    tasks=metaworld.resolve_tasks(sim.suite),
    episodes_per_task=sim.episodes_per_task,
    seed=sim.seed,
    max_steps=sim.max_steps,
    execute_steps=sim.execute_steps,
    image_size=sim.image_size,
    state=state_kind(config.data.robot.state_key),
    videos_per_outcome=0,
  )
  settings.validate(config.model.action_horizon)
  if config.model.data_action_dim != metaworld.ACTION_DIM:
    raise IncompatiblePolicyError(
      f"eval.sim runs Meta-World, whose actions are {metaworld.ACTION_DIM}-D; this model's "
      f"data_action_dim is {config.model.data_action_dim}"
    )
  if len(config.model.image_keys) != 1:
    raise IncompatiblePolicyError(
      f"eval.sim runs Meta-World, which renders one camera; the model reads "
      f"{list(config.model.image_keys)}"
    )
  if sim.num_envs < 1 or sim.episodes_per_task < 1:
    raise ValueError("eval.sim needs num_envs >= 1 and episodes_per_task >= 1")
  return settings


# ----------------------------------------------------------------------------- the report


def summarize(episodes: list[dict], tasks: tuple[str, ...]) -> dict[str, Any]:
  """Per task: episodes, successes, rate, 95% Wilson interval, mean steps to success; the
  average over tasks; with every task of a difficulty group present, the group averages."""
  per_task = {}
  for task in tasks:
    rows = [e for e in episodes if e["task"] == task]
    wins = [e for e in rows if e["success"]]
    low, high = metaworld.wilson_interval(len(wins), len(rows))
    per_task[task] = {
      "episodes": len(rows),
      "successes": len(wins),
      "success_rate": len(wins) / len(rows) if rows else 0.0,
      "interval95": [low, high],
      "mean_steps_to_success": float(np.mean([e["steps"] for e in wins])) if wins else None,
      "difficulty": metaworld.difficulty_of(task),
    }
  rates = [row["success_rate"] for row in per_task.values()]
  total = sum(row["episodes"] for row in per_task.values())
  wins = sum(row["successes"] for row in per_task.values())
  groups = {}
  for group, members in metaworld.DIFFICULTY.items():
    present = [per_task[t]["success_rate"] for t in members if t in per_task]
    if present and len(present) == len(members):
      groups[group] = float(np.mean(present))
  return {
    "tasks": per_task,
    "average": float(np.mean(rates)) if rates else 0.0,
    "episodes": total,
    "successes": wins,
    "interval95_pooled": list(metaworld.wilson_interval(wins, total)),
    "difficulty_groups": groups,
  }


def markdown(summary: dict[str, Any], title: str) -> str:
  lines = [
    f"## {title}",
    "",
    "| task | difficulty | success | 95% interval | episodes | mean steps to success |",
    "|---|---|---|---|---|---|",
  ]
  for task, row in summary["tasks"].items():
    low, high = row["interval95"]
    steps = row["mean_steps_to_success"]
    lines.append(
      f"| {task} | {row['difficulty']} | {row['success_rate']:.0%} | {low:.0%}-{high:.0%} | "
      f"{row['episodes']} | {'-' if steps is None else f'{steps:.0f}'} |"
    )
  low, high = summary["interval95_pooled"]
  lines.append(
    f"| **average** | | **{summary['average']:.1%}** | {low:.0%}-{high:.0%} (pooled) | "
    f"{summary['episodes']} | |"
  )
  if summary["difficulty_groups"]:
    lines += ["", "| group | average success |", "|---|---|"]
    lines += [f"| {g} | {rate:.1%} |" for g, rate in summary["difficulty_groups"].items()]
  return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks = list(summary["tasks"])
  rates = np.array([summary["tasks"][t]["success_rate"] for t in tasks])
  intervals = np.array([summary["tasks"][t]["interval95"] for t in tasks])
  figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(tasks) + 2), 4))
  positions = np.arange(len(tasks))
  errors = np.stack([rates - intervals[:, 0], intervals[:, 1] - rates])
  axis.bar(positions, rates, yerr=errors, capsize=3, color="tab:blue")
  axis.axhline(
    summary["average"], color="k", linestyle="--", label=f"average {summary['average']:.0%}"
  )
  axis.set_xticks(positions, [t.removesuffix("-v3") for t in tasks], rotation=60, ha="right")
  axis.set_ylim(0, 1.05)
  axis.set_ylabel("success rate (95% Wilson)")
  axis.set_title(title)
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def write_report(result: dict, settings: Settings, out_dir: str, *, title: str, extra=None) -> dict:
  """results.json, results.md, success.png and videos/*.mp4 into `out_dir`; returns the summary."""
  from ki.data import lerobot_writer  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  summary = summarize(result["episodes"], settings.tasks)
  report = {
    "title": title,
    "settings": dataclasses.asdict(settings),
    "summary": summary,
    "episodes": result["episodes"],
    "simulator": metaworld.describe(),
    **(extra or {}),
  }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(summary, title))
  plot(summary, os.path.join(out_dir, "success.png"), title)
  for name, frames in result["videos"].items():
    if frames is not None:
      path = os.path.join(out_dir, "videos", f"{name}.mp4")
      lerobot_writer.write_video(path, frames, fps=metaworld.FPS // 2)
  return summary


def evaluate(
  settings: Settings,
  out_dir: str,
  *,
  checkpoint: str | None = None,
  server: str | None = None,
  baseline: str | None = None,
  demos: str | None = None,
  num_envs: int = 4,
  progress: bool = True,
) -> dict:
  """One of checkpoint / server / baseline; writes the report and returns the summary."""
  if sum(x is not None for x in (checkpoint, server, baseline)) != 1:
    raise ValueError("give exactly one of --checkpoint, --server and --baseline")
  start = time.time()
  settings.validate()
  if baseline is not None:
    result = run_baseline(baseline, settings, demos=demos)
    title = f"baseline: {baseline}"
  else:
    if checkpoint is not None:
      policy = LocalPolicy.from_checkpoint(checkpoint, seed=settings.seed, batch_size=num_envs)
    else:
      policy = RemotePolicy(server, connections=num_envs)
    try:
      result = run_policy(policy, settings, num_envs=num_envs, progress=progress)
    finally:
      policy.close()
    title = f"{checkpoint or server}"
  extra = {"seconds": time.time() - start, "source": checkpoint or server or baseline}
  summary = write_report(result, settings, out_dir, title=title, extra=extra)
  logging.info(
    "Meta-World: average success %.3f over %d tasks", summary["average"], len(settings.tasks)
  )
  return summary


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  values = flags.FLAGS
  settings = Settings(
    tasks=metaworld.resolve_tasks(values.suite),
    episodes_per_task=values.episodes_per_task,
    seed=values.seed,
    max_steps=values.max_steps,
    execute_steps=values.execute_steps,
    delay=values.delay,
    strategy=values.strategy,
    image_size=values.image_size,
    state=values.state,
  )
  out = values.out or os.path.join(
    values.checkpoint or "/tmp", f"metaworld_{values.suite.replace(',', '+')}"
  )
  summary = evaluate(
    settings,
    out,
    checkpoint=values.checkpoint,
    server=values.server,
    baseline=values.baseline,
    demos=values.demos,
    num_envs=values.num_envs,
  )
  print(markdown(summary, out))
  print(f"written to {out}")


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("checkpoint", None, "Step folder or workdir of a trained policy.")
  flags.DEFINE_string("server", None, "ws://host:port of a running policy server instead.")
  flags.DEFINE_enum("baseline", None, list(BASELINES), "Evaluate a baseline instead.")
  flags.DEFINE_string(
    "demos", None, "The demos dataset (for the constant and nearest_demo baselines)."
  )
  flags.DEFINE_string("suite", "mt10", "mt10, mt50 or comma-separated task names.")
  flags.DEFINE_integer("episodes_per_task", 50, "Episodes per task.")
  flags.DEFINE_integer("seed", 1, "Benchmark seed of the initial configurations (demos use 0).")
  flags.DEFINE_integer("max_steps", DEFAULT_MAX_STEPS, "Step limit of an episode.")
  flags.DEFINE_integer("execute_steps", 8, "Steps of each chunk executed before re-planning.")
  flags.DEFINE_integer("delay", 0, "Simulated inference delay in control steps.")
  flags.DEFINE_enum("strategy", "sync", list(STRATEGIES), "How a delayed chunk is executed.")
  flags.DEFINE_integer("image_size", 128, "Rendered camera side (the model resizes it).")
  flags.DEFINE_enum("state", "state", ["state", "environment_state"], "The policy's state.")
  flags.DEFINE_integer("num_envs", 4, "Simulators in lockstep (one batched inference).")
  flags.DEFINE_string("out", None, "Report folder (default <checkpoint>/metaworld_<suite>).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  define_flags()
  app.run(main)
