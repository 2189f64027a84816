"""Meta-World expert demonstrations as a LeRobot v3.0 dataset, plus the assets ki trains with.

`generate` runs each task's scripted expert from the benchmark's own initial configurations
(`metaworld.MT1(task, seed)`, episode i -> configuration i % 50), first without rendering (cheap)
until the first success or the step limit; successful episodes are then replayed with rendering
(replays are deterministic: the same configuration and actions give the same trajectory, which is
checked) and written; failed ones are counted, not written. Episodes go to worker processes and
are written in a fixed order, so the dataset does not depend on the number of workers.

Features (LeRobot's Meta-World names):
  observation.image              video uint8 [S, S, 3], LeRobot's corner view, upright
  observation.state              float32 [4]   hand xyz + gripper opening (obs[:4])
  observation.environment_state  float32 [39]  the full simulator observation
  action                         float32 [4]   the clipped action that was executed
  next.success                   bool          info["success"] after this frame's action
The task string of an episode is the task's instruction (ki.sim.metaworld.INSTRUCTIONS). An
episode ends at its first success (LeRobot's evaluation stops there too).

`build_assets` writes what ki's Meta-World experiments read next to the dataset: quantile norm
stats per state key (`norm_stats_state.json`, `norm_stats_environment_state.json`), a FAST
tokenizer fitted on the normalised chunks, and a small SentencePiece model in PaliGemma's layout
trained on the dataset's prompts and the stage-1 scene questions (ki.sim.metaworld_questions), for
the models trained from scratch (`full` uses PaliGemma's).
"""

import dataclasses
import logging
import multiprocessing
import multiprocessing.util
import os
from typing import Any

import numpy as np
import tqdm

from ki.data import lerobot_writer
from ki.sim import metaworld, metaworld_questions

IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"
ENVIRONMENT_STATE_KEY = "observation.environment_state"
ACTION_KEY = "action"
SUCCESS_KEY = "next.success"
STATE_KEYS = {"state": STATE_KEY, "environment_state": ENVIRONMENT_STATE_KEY}
ACTION_HORIZON = 16  # the chunk ki's Meta-World experiments predict (0.2 s at 80 Hz)
TEXT_VOCAB_SIZE = 1024  # the from-scratch models' text pieces (ki.model.sizes.SYNTHETIC_VOCAB_SIZE)
FAST_VOCAB_SIZE = 256
FAST_SCALE = 10.0


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  task: str
  configuration: int
  seed: int
  image_size: int
  max_steps: int


def run_expert(spec: EpisodeSpec) -> tuple[np.ndarray, bool]:
  """The expert's clipped actions [T, 4] up to its first success (or the step limit), unrendered."""
  env = metaworld.worker_env(spec.task, spec.seed, None)
  policy = metaworld.expert(spec.task)
  observation = env.reset(spec.configuration)
  actions = []
  for _ in range(min(spec.max_steps, env.max_episode_steps)):
    action = np.clip(policy.get_action(observation.environment_state), -1.0, 1.0)
    actions.append(action)
    observation, success = env.step(action)
    if success:
      return np.asarray(actions, np.float32), True
  return np.asarray(actions, np.float32), False


def replay(spec: EpisodeSpec, actions: np.ndarray) -> dict[str, np.ndarray] | None:
  """Replays `actions` with rendering: frame t is what was seen before action t. None when the
  replay does not succeed at the last action (it must: the simulator is deterministic)."""
  env = metaworld.worker_env(spec.task, spec.seed, spec.image_size)
  observation = env.reset(spec.configuration)
  frames: dict[str, list] = {IMAGE_KEY: [], STATE_KEY: [], ENVIRONMENT_STATE_KEY: []}
  successes = []
  for action in actions:
    frames[IMAGE_KEY].append(observation.image)
    frames[STATE_KEY].append(observation.state)
    frames[ENVIRONMENT_STATE_KEY].append(observation.environment_state.astype(np.float32))
    observation, success = env.step(action)
    successes.append(success)
  if not successes[-1] or any(successes[:-1]):
    return None
  episode = {key: np.stack(values) for key, values in frames.items()}
  episode[ACTION_KEY] = np.asarray(actions, np.float32)
  episode[SUCCESS_KEY] = np.asarray(successes)
  return episode


def _episode(spec: EpisodeSpec) -> tuple[EpisodeSpec, str, dict | None]:
  """(spec, outcome, frames): outcome "kept", "expert_failed" or "replay_mismatch"."""
  actions, success = run_expert(spec)
  if not success:
    return spec, "expert_failed", None
  episode = replay(spec, actions)
  return spec, ("kept" if episode is not None else "replay_mismatch"), episode


def generate(
  out_dir: str,
  *,
  tasks: tuple[str, ...],
  episodes_per_task: int,
  seed: int = 0,
  image_size: int = 128,
  max_steps: int = metaworld.MAX_EPISODE_STEPS,
  workers: int = 2,
  episodes_per_file: int = 50,
  progress: bool = True,
) -> dict[str, Any]:
  """Writes `episodes_per_task` successful expert episodes of each task into `out_dir`.

  Failed expert runs are replaced by the next configurations (up to 3 x episodes_per_task tries
  per task) and counted. Returns a summary: per task kept / expert_failed / replay_mismatch and
  mean length, total frames.
  """
  metaworld.check_rendering(image_size, image_size)
  writer = lerobot_writer.Writer(
    out_dir,
    fps=metaworld.FPS,
    cameras={IMAGE_KEY: (image_size, image_size)},
    vectors={
      STATE_KEY: ("float32", ["x", "y", "z", "gripper"]),
      ENVIRONMENT_STATE_KEY: ("float32", [f"obs_{i}" for i in range(39)]),
      ACTION_KEY: ("float32", ["dx", "dy", "dz", "gripper"]),
    },
    flags=(SUCCESS_KEY,),
    episodes_per_file=episodes_per_file,
    robot_type="sawyer",
  )
  summary = {
    task: {"kept": 0, "expert_failed": 0, "replay_mismatch": 0, "lengths": []} for task in tasks
  }
  context = multiprocessing.get_context("spawn")
  bar = tqdm.tqdm(total=len(tasks) * episodes_per_task, disable=not progress, unit="episode")
  with context.Pool(max(1, workers), initializer=metaworld.init_worker) as pool:
    for task in tasks:
      attempt = 0
      while summary[task]["kept"] < episodes_per_task and attempt < 3 * episodes_per_task:
        needed = episodes_per_task - summary[task]["kept"]
        specs = [EpisodeSpec(task, attempt + i, seed, image_size, max_steps) for i in range(needed)]
        attempt += needed
        for _, outcome, episode in pool.imap(_episode, specs):
          summary[task][outcome] += 1
          if episode is not None:
            writer.add_episode(metaworld.INSTRUCTIONS[task], episode)
            summary[task]["lengths"].append(len(episode[ACTION_KEY]))
            bar.update(1)
        bar.set_postfix(task=task)
      if summary[task]["kept"] < episodes_per_task:
        logging.warning(
          "%s: only %d of %d expert episodes succeeded in %d tries",
          task,
          summary[task]["kept"],
          episodes_per_task,
          attempt,
        )
    pool.close()
    pool.join()
  bar.close()
  info = writer.finish()
  for row in summary.values():
    lengths = row.pop("lengths")
    row["mean_length"] = float(np.mean(lengths)) if lengths else 0.0
  return {"tasks": summary, "total_frames": info["total_frames"], "seed": seed}


def assets_dir(dataset_dir: str) -> str:
  """Where `build_assets` puts a dataset's assets: a sibling folder `<dataset>_assets`."""
  return os.path.normpath(dataset_dir) + "_assets"


def build_assets(
  dataset_dir: str, out_dir: str | None = None, *, action_horizon: int = ACTION_HORIZON
) -> str:
  """Norm stats per state key, the FAST tokenizer and a SentencePiece model for `dataset_dir`."""
  # pylint: disable=g-import-not-at-top
  from ki.data import lerobot, lerobot_stats, normalize
  from ki.tokenizers import fast_fit, prompt

  # pylint: enable=g-import-not-at-top
  out_dir = out_dir or assets_dir(dataset_dir)
  os.makedirs(out_dir, exist_ok=True)
  stats = {}
  for name, key in STATE_KEYS.items():
    stats[name] = lerobot_stats.compute_norm_stats(
      dataset_dir,
      state_key=key,
      action_key=ACTION_KEY,
      action_horizon=action_horizon,
      progress=False,
    )
    normalize.save_norm_stats(stats[name], os.path.join(out_dir, f"norm_stats_{name}.json"))
  chunks = lerobot_stats.normalized_chunks(
    dataset_dir,
    stats["state"],
    state_key=STATE_KEY,
    action_key=ACTION_KEY,
    action_horizon=action_horizon,
    max_chunks=20_000,
    progress=False,
  )
  tokenizer, report = fast_fit.fit(chunks, vocab_size=FAST_VOCAB_SIZE, scale=FAST_SCALE)
  tokenizer.save(os.path.join(out_dir, "fast_tokenizer"))
  logging.info("FAST tokenizer: %s", report)
  dataset = lerobot.open_dataset(dataset_dir)
  prompt.build_sentencepiece_model(
    tokenizer_texts(dataset.tasks.values()),
    os.path.join(out_dir, "tokenizer.model"),
    text_vocab_size=TEXT_VOCAB_SIZE,
  )
  return out_dir


def tokenizer_texts(instructions) -> list[str]:
  """What the SentencePiece model is trained on: the prompts the policy reads (every instruction
  with states spread over the 256 bins) and every scene question and answer, so one tokenizer
  serves the demonstrations and the stage-1 questions (ki.sim.metaworld_questions)."""
  from ki.tokenizers import prompt  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  texts = [
    prompt.robot_prompt_text(instruction, rng.uniform(-1, 1, size))
    for instruction in instructions
    for size in (metaworld.STATE_DIM, metaworld.ENVIRONMENT_STATE_DIM)
    for _ in range(20)
  ]
  return texts + metaworld_questions.corpus_texts()
