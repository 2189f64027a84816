"""Synthetic DROID has DROID's exact feature spec, reads back through TFDS, and is learnable."""

import json

import numpy as np
import tensorflow_datasets as tfds

from ki.data import droid, synthetic_droid, synthetic_scene

# DROID's spec, from shared/reference/droid_rlds.md: path -> (kind, dtype, shape, encoding).
_VECTOR = lambda n: ("Tensor", "float64", [n], None)  # noqa: E731
_IMAGE = ("Image", "uint8", [180, 320, 3], "jpeg")
_TEXT = ("Text", None, None, None)
_BOOL = ("Scalar", "bool", [], None)
EXPECTED_SPEC = {
  "episode_metadata/file_path": _TEXT,
  "episode_metadata/recording_folderpath": _TEXT,
  "steps/is_first": _BOOL,
  "steps/is_last": _BOOL,
  "steps/is_terminal": _BOOL,
  "steps/language_instruction": _TEXT,
  "steps/language_instruction_2": _TEXT,
  "steps/language_instruction_3": _TEXT,
  "steps/observation/exterior_image_1_left": _IMAGE,
  "steps/observation/exterior_image_2_left": _IMAGE,
  "steps/observation/wrist_image_left": _IMAGE,
  "steps/observation/cartesian_position": _VECTOR(6),
  "steps/observation/joint_position": _VECTOR(7),
  "steps/observation/gripper_position": _VECTOR(1),
  "steps/action_dict/cartesian_position": _VECTOR(6),
  "steps/action_dict/cartesian_velocity": _VECTOR(6),
  "steps/action_dict/joint_position": _VECTOR(7),
  "steps/action_dict/joint_velocity": _VECTOR(7),
  "steps/action_dict/gripper_position": _VECTOR(1),
  "steps/action_dict/gripper_velocity": _VECTOR(1),
  "steps/action": _VECTOR(7),
  "steps/discount": ("Scalar", "float32", [], None),
  "steps/reward": ("Scalar", "float32", [], None),
}


def _flatten_features_json(node, prefix=""):
  """features.json (TFDS's proto as JSON) -> {path: (kind, dtype, shape, encoding)}."""
  if "featuresDict" in node:
    out = {}
    for name, child in node["featuresDict"]["features"].items():
      out.update(_flatten_features_json(child, f"{prefix}{name}/"))
    return out
  if "sequence" in node:  # tfds.features.Dataset: the steps.
    return _flatten_features_json(node["sequence"]["feature"], prefix)
  kind = node["pythonClassName"].rsplit(".", 1)[-1]
  path = prefix.rstrip("/")
  if "image" in node:
    image = node["image"]
    shape = [int(d) for d in image["shape"]["dimensions"]]
    return {path: (kind, image["dtype"], shape, image["encodingFormat"])}
  if "text" in node:
    return {path: (kind, None, None, None)}
  tensor = node["tensor"]
  shape = [int(d) for d in tensor.get("shape", {}).get("dimensions", [])]
  return {path: (kind, tensor["dtype"], shape, None)}


def test_features_json_is_droids_spec(synthetic_dataset):
  out_dir, info = synthetic_dataset
  with open(out_dir / info["dataset_dir"] / "features.json") as f:
    assert _flatten_features_json(json.load(f)) == EXPECTED_SPEC


def test_tfds_reads_it_back_with_droids_types(synthetic_dataset):
  out_dir, info = synthetic_dataset
  version_dir = out_dir / "droid" / "1.0.1"
  assert info["dataset_dir"] == "droid/1.0.1"
  shards = sorted(p.name for p in version_dir.glob("droid-train.tfrecord-*"))
  assert shards == [f"droid-train.tfrecord-{i:05d}-of-00003" for i in range(3)]
  builder = tfds.builder_from_directory(str(version_dir))
  assert builder.info.splits["train"].num_examples == 12
  assert all(n >= 2 for n in builder.info.splits["train"].shard_lengths)  # Several per shard.
  episode = next(iter(tfds.as_numpy(builder.as_dataset(split="train[1shard]").take(1))))
  steps = list(episode["steps"])  # as_numpy turns the nested steps into an iterable.
  assert 30 <= len(steps) <= 80
  assert steps[0]["is_first"] and steps[-1]["is_last"] and not steps[0]["is_last"]
  obs = steps[0]["observation"]
  for camera in droid.CAMERA_NAMES:
    assert obs[camera].shape == (180, 320, 3) and obs[camera].dtype == np.uint8
  assert obs["joint_position"].dtype == np.float64
  assert isinstance(steps[0]["language_instruction"], bytes)


def test_actions_are_consistent_with_observations():
  episode = synthetic_droid.make_episode(0, 2)
  steps = droid.stack_steps(episode["steps"])
  observed, commanded = steps["observation"], steps["action_dict"]
  # The action at t commands the joint state at t + 1; the velocity is that step at 15 Hz.
  np.testing.assert_allclose(commanded["joint_position"][:-1], observed["joint_position"][1:])
  np.testing.assert_allclose(
    commanded["joint_velocity"][:-1],
    (observed["joint_position"][1:] - observed["joint_position"][:-1]) * droid.CONTROL_HZ,
  )
  gripper = observed["gripper_position"][:, 0]
  assert gripper[0] == 0.0 and gripper[-1] == 1.0  # Open at the start, closed at the end.


def test_final_joints_are_determined_by_the_target():
  """The same target position gives the same final joints, whatever the episode: learnable."""
  plans = [synthetic_droid.plan_episode(0, i) for i in range(40)]
  for plan in plans:
    if plan.failure:
      continue
    expected = synthetic_scene.joints_from_position(
      np.array([plan.target.x, plan.target.y, synthetic_scene.GRASP_HEIGHT])
    )
    grasp_step = np.flatnonzero(plan.trajectory.gripper > 0)[0]
    np.testing.assert_allclose(plan.joints[grasp_step], expected, atol=3e-3)
    named = [text for text in plan.instructions if text]
    assert all(plan.target.name in text for text in named)


def test_filters_have_work(synthetic_dataset):
  _, info = synthetic_dataset
  assert info["failure_episodes"] == 1 and info["no_instruction_episodes"] == 1
  assert info["idle_start_episodes"] >= 2 and info["idle_end_episodes"] >= 2
  plans = [synthetic_droid.plan_episode(0, i) for i in range(info["episodes"])]
  for plan in plans:
    velocity = np.diff(plan.joints, axis=0, append=plan.joints[-1:]) * droid.CONTROL_HZ
    ranges = droid.keep_ranges(velocity)
    assert len(ranges) == 1  # One motion, idle stretches cut at the ends.
    start, end = ranges[0]
    if plan.idle_start:
      assert start == plan.idle_start  # The first kept frame is the one whose action moves.
    # The first still step still differs from the last moving one, so the idle run starts one
    # step into the still stretch; then the last 10 frames go.
    motion_end = len(plan.joints) - plan.idle_end + (1 if plan.idle_end else 0)
    assert end == motion_end - droid.DROP_LAST_FRAMES


def test_vlm_set_and_text_corpus(synthetic_dataset):
  out_dir, info = synthetic_dataset
  lines = {
    split: [json.loads(line) for line in open(out_dir / "vlm" / f"{split}.jsonl")]
    for split in ("train", "heldout")
  }
  assert len(lines["train"]) == info["vlm_lines"]["train"] == 27 and len(lines["heldout"]) == 3
  train_images = {item["image"] for item in lines["train"]}
  assert not train_images & {item["image"] for item in lines["heldout"]}
  for item in lines["train"][:5]:
    assert (out_dir / "vlm" / item["image"]).exists() and item["prompt"] and item["answer"]
  corpus = (out_dir / "text_corpus.txt").read_text().splitlines()
  assert "pick up the red block" in corpus and "255" in corpus
  assert all(item["answer"] in corpus for item in lines["train"])
  # Typed one-word answers from the type's answer set (the KI ablation scores a restricted choice).
  for item in lines["train"] + lines["heldout"]:
    assert item["answer"] in synthetic_droid.QUESTION_TYPES[item["type"]], item
  assert len({item["type"] for item in lines["train"]}) >= 4
  if info["sentencepiece_model"]:
    from ki.tokenizers import prompt

    tokenizer = prompt.PromptTokenizer(str(out_dir / info["sentencepiece_model"]))
    assert tokenizer.decode(tokenizer.encode("grab the blue cup")) == "grab the blue cup"


def test_same_arguments_give_identical_bytes(tmp_path):
  paths = []
  for name in ("a", "b"):
    synthetic_droid.generate(
      str(tmp_path / name), episodes=2, episodes_per_shard=1, vlm_images=2, text_vocab_size=400
    )
    paths.append(tmp_path / name)
  files = sorted(p.relative_to(paths[0]) for p in paths[0].rglob("*") if p.is_file())
  assert len(files) > 5
  for relative in files:
    assert (paths[0] / relative).read_bytes() == (paths[1] / relative).read_bytes(), relative
