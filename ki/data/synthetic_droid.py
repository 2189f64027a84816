r"""Synthetic DROID: a real TFDS RLDS dataset with DROID's exact spec, and learnable content.

`generate(out_dir, episodes=...)` (command line: python -m data_prep.make_synthetic_droid) writes

  OUT/droid/1.0.1/               TFDS RLDS dataset (tfds.builder_from_directory opens it)
  OUT/vlm/images/NNNNN.jpg       VLM co-training images of the same kind of scenes
  OUT/vlm/train.jsonl            {"image": "images/NNNNN.jpg", "prompt", "answer", "type"}: one-word
                                 answers to questions of QUESTION_TYPES about the image
  OUT/vlm/heldout.jsonl          same, for images never seen in train.jsonl
  OUT/text_corpus.txt            every instruction, prompt, answer and prompt-template word
  OUT/sentencepiece.model        a small PaliGemma-layout tokenizer trained on the corpus
  OUT/synthetic_info.json        what was generated (episode counts, failures, idle stretches)

Each episode: a tabletop with 2-4 coloured blocks and cups; the instruction names one of them; the
arm reaches for it, descends, closes the gripper and lifts (ki/data/synthetic_scene.py). About
14% of episodes are failures (they reach for a different object, and their file_path says
/failure/), 10% have no instruction at all, and about half idle for 8-14 steps at the start
and/or end, so the success, instruction and idle filters all have work. The same arguments give a
byte-identical dataset.
"""

import dataclasses
import json
import os

from absl import logging
import numpy as np
from PIL import Image

from ki.data import droid, rlds_writer, synthetic_scene

FAILURE_EVERY = 7
NO_INSTRUCTION_EVERY = 10
IDLE_RATE = 0.5
LABS = ("AUTOLab", "IRIS", "ILIAD", "RAIL", "PennPAL")
HELDOUT_FRACTION = 0.1
# The words of pi0.5's robot prompt, so the tokenizer has pieces for them.
PROMPT_TEMPLATE_TEXTS = ("Task: ", ", State: ", ";", "Action: ", "Question: ", "Answer: ")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _instructions(
  rng: np.random.Generator, target: synthetic_scene.SceneObject, *, empty: bool
) -> list[str]:
  """The three instruction fields: 1-3 phrasings in random slots, or all empty."""
  fields = ["", "", ""]
  if empty:
    return fields
  count = int(rng.integers(1, 4))
  templates = rng.choice(synthetic_scene.INSTRUCTION_TEMPLATES, size=count, replace=False)
  for slot, template in zip(rng.choice(3, size=count, replace=False), templates):
    fields[slot] = str(template).format(color=target.color, shape=target.shape)
  return fields


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
  """Everything about an episode except its images (cheap to sample)."""

  scene: synthetic_scene.Scene
  target: synthetic_scene.SceneObject
  failure: bool
  instructions: list[str]
  idle_start: int
  idle_end: int
  trajectory: synthetic_scene.Trajectory
  joints: np.ndarray  # [T, 7]


def plan_episode(seed: int, index: int) -> EpisodePlan:
  """Samples episode `index`; depends only on (seed, index).

  Failures (every 7th episode, from the 6th) reach for a wrong object; every 10th episode, from
  the 4th, has no instruction; about half the episodes idle at the start and/or the end.
  """
  rng = np.random.default_rng([seed, index])
  scene = synthetic_scene.sample_scene(rng)
  target = scene.objects[int(rng.integers(len(scene.objects)))]
  failure = index % FAILURE_EVERY == FAILURE_EVERY - 2
  instructions = _instructions(rng, target, empty=index % NO_INSTRUCTION_EVERY == 3)
  reached = target
  if failure:
    others = [o for o in scene.objects if o is not target]
    reached = others[int(rng.integers(len(others)))]
  idle_start = int(rng.integers(8, 13)) if rng.random() < IDLE_RATE else 0
  idle_end = int(rng.integers(8, 15)) if rng.random() < IDLE_RATE else 0
  trajectory = synthetic_scene.sample_trajectory(
    rng, reached, idle_start=idle_start, idle_end=idle_end
  )
  joints = synthetic_scene.joint_trajectory(rng, trajectory)
  return EpisodePlan(scene, target, failure, instructions, idle_start, idle_end, trajectory, joints)


def make_episode(seed: int, index: int) -> dict:
  """One RLDS episode (TFDS example dict) with numpy images; depends only on (seed, index)."""
  plan = plan_episode(seed, index)
  scene, trajectory, joints, instructions = (
    plan.scene,
    plan.trajectory,
    plan.joints,
    plan.instructions,
  )
  failure = plan.failure
  gripper = trajectory.gripper[:, None]
  cartesian = synthetic_scene.cartesian_from_position(trajectory.position)
  length = len(joints)
  # The action at step t commands the state at step t + 1; the last step holds its position.
  following = np.minimum(np.arange(length) + 1, length - 1)
  hz = droid.CONTROL_HZ
  lab = LABS[index % len(LABS)]
  outcome = "failure" if failure else "success"
  folder = f"/synthetic/droid/{lab}/{outcome}/2026-01-{1 + index % 28:02d}/episode_{index:05d}"
  steps = []
  for t in range(length):
    position, closure = trajectory.position[t], float(trajectory.gripper[t])
    steps.append(
      {
        "is_first": t == 0,
        "is_last": t == length - 1,
        "is_terminal": t == length - 1,
        "language_instruction": instructions[0],
        "language_instruction_2": instructions[1],
        "language_instruction_3": instructions[2],
        "observation": {
          "exterior_image_1_left": synthetic_scene.render_exterior(
            scene, synthetic_scene.FRONT_VIEW, position, closure
          ),
          "exterior_image_2_left": synthetic_scene.render_exterior(
            scene, synthetic_scene.SIDE_VIEW, position, closure
          ),
          "wrist_image_left": synthetic_scene.render_wrist(scene, position, closure),
          "cartesian_position": cartesian[t],
          "joint_position": joints[t],
          "gripper_position": gripper[t],
        },
        "action_dict": {
          "cartesian_position": cartesian[following[t]],
          "cartesian_velocity": (cartesian[following[t]] - cartesian[t]) * hz,
          "joint_position": joints[following[t]],
          "joint_velocity": (joints[following[t]] - joints[t]) * hz,
          "gripper_position": gripper[following[t]],
          "gripper_velocity": (gripper[following[t]] - gripper[t]) * hz,
        },
        # DROID documents `action` inconsistently; here: cartesian velocity + gripper position.
        "action": np.concatenate(
          [(cartesian[following[t]] - cartesian[t]) * hz, gripper[following[t]]]
        ),
        "discount": np.float32(1.0),
        "reward": np.float32(t == length - 1 and not failure),
      }
    )
  return {
    "episode_metadata": {
      "file_path": f"{folder}/trajectory.h5",
      "recording_folderpath": f"{folder}/recordings/MP4",
    },
    "steps": steps,
  }


# The scene question types, each with its answer set: every answer is one word, so a model's
# answer can be scored by restricting its choice to the candidates of the question's type (the
# KI ablation's VQA accuracy, ki/ablation/probes.py). Every type needs the image: the question
# names nothing that gives its answer away (colours in a scene are distinct).
QUESTION_TYPES = {
  "colour_left_of": tuple(synthetic_scene.COLORS),
  "colour_right_of": tuple(synthetic_scene.COLORS),
  "count": ("two", "three", "four"),
  "count_shape": ("zero", "one", "two", "three", "four"),
  "shape": synthetic_scene.SHAPES,
  "exists": ("yes", "no"),
  "where": ("left", "middle", "right"),
}
_COUNT_WORDS = ("zero", "one", "two", "three", "four")


def _questions(
  rng: np.random.Generator, scene: synthetic_scene.Scene
) -> list[tuple[str, str, str]]:
  """Three (type, question, answer) triples about one scene, of three different types.

  Relations are as seen from exterior camera 1 (x grows to the right): "left of X" is the
  nearest object to X's left. "exists" asks about a present or an absent colour with equal odds.
  """
  by_x = sorted(scene.objects, key=lambda o: o.x)
  obj = scene.objects[int(rng.integers(len(scene.objects)))]
  # Anchors that have a neighbour on the asked side (a scene has at least two objects).
  right_anchor = by_x[int(rng.integers(len(by_x) - 1))]
  left_anchor = by_x[1 + int(rng.integers(len(by_x) - 1))]
  absent = [c for c in synthetic_scene.COLORS if c not in {o.color for o in scene.objects}]
  asked = str(rng.choice([obj.color, absent[int(rng.integers(len(absent)))]]))
  shape = str(rng.choice(synthetic_scene.SHAPES))
  candidates = [
    (
      "colour_left_of",
      f"What colour is the object left of the {left_anchor.name}?",
      by_x[by_x.index(left_anchor) - 1].color,
    ),
    (
      "colour_right_of",
      f"What colour is the object right of the {right_anchor.name}?",
      by_x[by_x.index(right_anchor) + 1].color,
    ),
    ("count", "How many objects are on the table?", NUMBER_WORDS[len(scene.objects)]),
    (
      "count_shape",
      f"How many {shape}s are on the table?",
      _COUNT_WORDS[sum(o.shape == shape for o in scene.objects)],
    ),
    ("shape", f"What shape is the {obj.color} object?", obj.shape),
    ("exists", f"Is there a {asked} object?", "yes" if asked == obj.color else "no"),
    ("where", f"Where is the {obj.name}?", ("left", "middle", "right")[_third(obj.x)]),
  ]
  chosen = rng.choice(len(candidates), size=3, replace=False)
  return [candidates[i] for i in sorted(chosen)]


def _third(x: float) -> int:
  """0, 1 or 2: the left, middle or right third of the table (synthetic_scene.position_word)."""
  return 0 if x < 1 / 3 else (1 if x < 2 / 3 else 2)


def write_vlm_set(out_dir: str, *, num_images: int, seed: int) -> dict[str, int]:
  """JPEG scenes + train/heldout JSONL manifests under `out_dir`; returns line counts per split."""
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  num_heldout = max(1, int(round(num_images * HELDOUT_FRACTION)))
  splits = {"train": [], "heldout": []}
  for index in range(num_images):
    # Offset the stream so VLM scenes are not copies of the robot episodes' scenes.
    rng = np.random.default_rng([seed, 1_000_000 + index])
    scene = synthetic_scene.sample_scene(rng)
    position = np.array([rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4), 0.35])
    image = synthetic_scene.render_exterior(scene, synthetic_scene.FRONT_VIEW, position)
    relative = f"images/{index:05d}.jpg"
    Image.fromarray(image).save(os.path.join(out_dir, relative), quality=90)
    split = "heldout" if index >= num_images - num_heldout else "train"
    for kind, prompt, answer in _questions(rng, scene):
      splits[split].append({"image": relative, "prompt": prompt, "answer": answer, "type": kind})
  for split, lines in splits.items():
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  return {split: len(lines) for split, lines in splits.items()}


def corpus_texts(vlm_dir: str) -> list[str]:
  """Every text the models will read: instructions for all targets, VLM prompts/answers, the
  prompt template and the 256 state-bin numbers."""
  texts = []
  for color in synthetic_scene.COLORS:
    for shape in synthetic_scene.SHAPES:
      texts += [t.format(color=color, shape=shape) for t in synthetic_scene.INSTRUCTION_TEMPLATES]
  for split in ("train", "heldout"):
    with open(os.path.join(vlm_dir, f"{split}.jsonl")) as f:
      for line in f:
        item = json.loads(line)
        texts += [item["prompt"], item["answer"]]
  texts += list(PROMPT_TEMPLATE_TEXTS) + [str(n) for n in range(256)]
  return list(dict.fromkeys(texts))  # Unique, in first-seen order (deterministic).


def _write_sentencepiece(texts: list[str], path: str, text_vocab_size: int) -> str | None:
  try:
    from ki.tokenizers import prompt
  except ImportError as e:
    logging.warning("ki.tokenizers.prompt unavailable (%s); no SentencePiece model written", e)
    return None
  return prompt.build_sentencepiece_model(texts, path, text_vocab_size=text_vocab_size)


def generate(
  out_dir: str,
  *,
  episodes: int,
  seed: int = 0,
  episodes_per_shard: int = 8,
  vlm_images: int = 200,
  text_vocab_size: int = 1024,
) -> dict:
  """Writes everything listed in the module docstring; returns the synthetic_info.json dict."""
  os.makedirs(out_dir, exist_ok=True)
  num_shards = max(1, -(-episodes // episodes_per_shard))
  dataset_dir = rlds_writer.write_rlds_dataset(
    out_dir,
    lambda index: make_episode(seed, index),
    episodes,
    num_shards=num_shards,
    description=f"Synthetic DROID (ki data_prep.make_synthetic_droid, seed {seed}): rendered "
    "tabletop scenes, not real robot data.",
  )
  plans = [plan_episode(seed, index) for index in range(episodes)]
  vlm_dir = os.path.join(out_dir, "vlm")
  vlm_counts = write_vlm_set(vlm_dir, num_images=vlm_images, seed=seed)
  texts = corpus_texts(vlm_dir)
  with open(os.path.join(out_dir, "text_corpus.txt"), "w") as f:
    f.writelines(text.replace("\n", " ") + "\n" for text in texts)
  tokenizer = _write_sentencepiece(
    texts, os.path.join(out_dir, "sentencepiece.model"), text_vocab_size
  )
  info = {
    "dataset_dir": os.path.relpath(dataset_dir, out_dir),
    "episodes": episodes,
    "num_shards": num_shards,
    "seed": seed,
    "steps": sum(len(p.joints) for p in plans),
    "failure_episodes": sum(p.failure for p in plans),
    "no_instruction_episodes": sum(not any(p.instructions) for p in plans),
    "idle_start_episodes": sum(p.idle_start > 0 for p in plans),
    "idle_end_episodes": sum(p.idle_end > 0 for p in plans),
    "vlm_lines": vlm_counts,
    "text_corpus_lines": len(texts),
    "sentencepiece_model": os.path.basename(tokenizer) if tokenizer else None,
  }
  with open(os.path.join(out_dir, "synthetic_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info
