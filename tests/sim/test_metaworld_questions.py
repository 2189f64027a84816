"""Meta-World scene questions (stage 1): the manifest format, determinism whatever the number of
workers, held-out scenes, answers a tokenizer can tell apart, and answers that match the image.

Scenes render in spawned worker processes (write_vlm_set's own pool): this pytest process may have
run JAX, and a GL context here could crash it."""

import json

import numpy as np
import pytest

from experiments import metaworld_ki
from ki.ablation import probes
from ki.sim import metaworld_questions
from ki.train import setup as setup_lib
from ki.train import trainer as trainer_lib

pytestmark = pytest.mark.xdist_group("metaworld")

# Two scenes (puck: left/right, marker colour; drawer: open/closed) and few environments to build;
# seed 0 gives both answers of left/right, open/closed and gripper in 8 scenes.
TASKS = ("pick-place-v3", "drawer-open-v3")
NUM_SCENES = 8
IMAGE_SIZE = 64
ARGUMENTS = dict(
  num_scenes=NUM_SCENES, seed=0, image_size=IMAGE_SIZE, heldout_fraction=0.2, tasks=TASKS
)


@pytest.fixture(scope="module")
def question_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("metaworld_questions") / "one_worker"
  summary = metaworld_questions.write_vlm_set(str(root), workers=1, progress=False, **ARGUMENTS)
  return root, summary


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _all_lines(root):
  return _lines(root / "train.jsonl") + _lines(root / "heldout.jsonl")


def test_manifests_are_typed_one_word_answers_about_stored_images(question_set):
  root, summary = question_set
  train, heldout = _lines(root / "train.jsonl"), _lines(root / "heldout.jsonl")
  assert summary["lines"] == {"train": len(train), "heldout": len(heldout)}
  assert summary["scenes"] == {"train": 6, "heldout": 2}
  for line in train + heldout:
    assert set(line) == {"image", "prompt", "answer", "type"}
    assert line["answer"] in metaworld_questions.QUESTION_TYPES[line["type"]], line
    assert (root / line["image"]).read_bytes()[:2] == b"\xff\xd8"  # a JPEG
  texts = set(metaworld_questions.corpus_texts())
  assert all(line["prompt"] in texts and line["answer"] in texts for line in train + heldout)
  # Every scene is asked what it shows; these two tasks give puck and drawer scenes.
  assert summary["types"]["object"]["count"] == NUM_SCENES
  assert {line["answer"] for line in train + heldout if line["type"] == "object"} == {
    "puck",
    "drawer",
  }
  for kind in ("left_or_right", "open_or_closed", "gripper"):
    answers = {line["answer"] for line in train + heldout if line["type"] == kind}
    assert answers == set(metaworld_questions.QUESTION_TYPES[kind]), kind


def test_held_out_scenes_are_never_in_train(question_set):
  root, _ = question_set
  train, heldout = _lines(root / "train.jsonl"), _lines(root / "heldout.jsonl")
  assert heldout and not {line["image"] for line in train} & {line["image"] for line in heldout}
  assert len({line["image"] for line in heldout}) == 2


def test_the_set_does_not_depend_on_the_number_of_workers(question_set, tmp_path):
  root, summary = question_set
  again = tmp_path / "two_workers"
  assert (
    metaworld_questions.write_vlm_set(str(again), workers=2, progress=False, **ARGUMENTS) == summary
  )
  files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
  for relative in files:
    assert (root / relative).read_bytes() == (again / relative).read_bytes(), relative


def test_the_ablation_scores_the_questions_with_the_demos_tokenizer(
  question_set, demos, monkeypatch, tmp_path
):
  """What ki.ablation.probes scores: each question's candidates by their first token, under the
  tokenizer the Meta-World assets train (demo prompts + these questions); vqa_set refuses answers
  of a type sharing a first token, and a question of a type it was not given."""
  root, _ = question_set
  monkeypatch.setenv("KI_METAWORLD", str(demos[0]))
  config = metaworld_ki.get_config("smoke")
  model_config = setup_lib.training_model(config)
  tokenizer = trainer_lib.build_tokenizer(config, model_config)
  manifest = root / "heldout.jsonl"
  lines = _lines(manifest)
  vqa = probes.vqa_set(
    str(manifest),
    tokenizer,
    model_config,
    limit=len(lines),
    question_types=metaworld_questions.QUESTION_TYPES,
  )
  assert vqa.types == [line["type"] for line in lines]
  for kind, candidates, answer in zip(vqa.types, vqa.candidates, vqa.answer):
    words = metaworld_questions.QUESTION_TYPES[kind]
    ids = candidates[candidates >= 0]
    assert len(ids) == len(words) == len(set(ids.tolist())), kind
    assert 0 <= answer < len(words)
  with pytest.raises(ValueError, match="not one of"):
    probes.vqa_set(str(manifest), tokenizer, model_config, limit=len(lines))


def test_left_and_right_are_the_images(question_set):
  """Left/right answers come from the pixels that change when the object and the gripper are
  hidden; the camera's geometry (pinhole projection of the simulator's positions, flipped as Env
  flips) must put them on the same sides, at the same columns to within 2 pixels."""
  root, _ = question_set
  scenes = {record["image"]: record for record in _lines(root / "scenes.jsonl")}
  asked = [line for line in _all_lines(root) if line["type"] == "left_or_right"]
  assert asked
  for line in asked:
    facts = scenes[line["image"]]["facts"]
    projected = facts["object_projected_column"] - facts["gripper_projected_column"]
    assert line["answer"] == ("right" if projected > 0 else "left"), facts
    assert abs(facts["object_column"] - facts["object_projected_column"]) < 2, facts
    assert abs(facts["gripper_column"] - facts["gripper_projected_column"]) < 2, facts


def test_the_marker_colour_is_the_colour_of_its_pixels(question_set):
  """The goal marker's colour word (from the simulator's rgba) is the dominant channel of the
  image pixels the marker covers (those that change when it is hidden)."""
  root, _ = question_set
  scenes = {record["image"]: record for record in _lines(root / "scenes.jsonl")}
  asked = [line for line in _all_lines(root) if line["type"] == "marker_colour"]
  assert asked and {line["answer"] for line in asked} == {"blue"}  # pick-place's marker
  for line in asked:
    rgb = scenes[line["image"]]["facts"]["marker_rgb"]
    assert metaworld_questions.COLOURS[int(np.argmax(rgb))] == line["answer"], rgb


def test_open_or_closed_is_the_final_joint_state(question_set):
  """Read after the hand has moved (it may push the drawer), with a gap between the two words."""
  root, _ = question_set
  scenes = {record["image"]: record for record in _lines(root / "scenes.jsonl")}
  drawer = metaworld_questions.JOINTS["drawer"]
  asked = [line for line in _all_lines(root) if line["type"] == "open_or_closed"]
  assert {line["answer"] for line in asked} == {"open", "closed"}
  for line in asked:
    joint = scenes[line["image"]]["facts"]["joint"]
    assert joint >= drawer.open_above if line["answer"] == "open" else joint <= drawer.closed_below


def test_only_mt10_tasks_have_scene_questions(tmp_path):
  with pytest.raises(ValueError, match="MT10"):
    metaworld_questions.write_vlm_set(str(tmp_path), num_scenes=1, seed=0, tasks=("soccer-v3",))
  texts = metaworld_questions.corpus_texts()
  assert texts == metaworld_questions.corpus_texts() and len(texts) == len(set(texts))
  assert "Is the drawer open or closed?" in texts and "window" in texts
