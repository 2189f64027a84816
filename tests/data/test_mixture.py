"""Co-training mixture: VLM examples from a JSONL manifest and from a TFDS dataset join robot
frames in the configured proportions, with has_actions=False and loss only on the answer."""

import tempfile

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ki.batch import Batch
from ki.data import pipeline, sources
from tests.data import pipeline_fixtures as fixtures

FRAMES = [fixtures.frame(e, s) for e in range(3) for s in range(10)]
TFDS_EXAMPLES = 10


class _CaptionSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny VLM set with non-default feature names, as a co-training dataset might have."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums file to look up: nothing is downloaded (see ki/data/rlds_writer.py).
  code_path = None

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "picture": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "question": tfds.features.Text(),
          "caption": tfds.features.Text(),
        }
      )
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(TFDS_EXAMPLES):
      image = np.full((24, 40, 3), (20 * i, 50, 200), np.uint8)
      yield i, {"picture": image, "question": f"what is shown in picture {i}?", "caption": "blue"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixture")
  builder = _CaptionSet(data_dir=str(root / "tfds"))
  builder.download_and_prepare(
    download_dir=tempfile.mkdtemp(prefix="ki_mixture_downloads_"),
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return {
    "robot": fixtures.write_shards(root / "robot", FRAMES),
    "manifest": fixtures.vlm_manifest(str(root / "vlm"), count=12, corrupt=2),
    "tfds": builder.data_dir,
    "tokenizer": fixtures.tokenizer(root),
    "stats": fixtures.norm_stats(FRAMES),
  }


def make(data, vlm_sources, *, robot_weight=1.0, batch=8, **overrides):
  c = pipeline.default_config()
  c.update(
    dict(
      arrayrecord_dir=data["robot"],
      robot_weight=robot_weight,
      vlm_sources=tuple(vlm_sources),
      **overrides,
    )
  )
  return pipeline.make_iterator(
    c,
    fixtures.model_config(),
    tokenizer=data["tokenizer"],
    norm_stats=data["stats"],
    split="train",
    seed=0,
    process_index=0,
    process_count=1,
    per_host_batch_size=batch,
    train=True,
  )


def test_mixture_follows_the_weights(data):
  iterator = make(
    data, [{"kind": "jsonl", "path": data["manifest"], "weight": 1.0}], robot_weight=3.0
  )
  has_actions = np.concatenate([next(iterator).observation.has_actions for _ in range(40)])
  assert abs(has_actions.mean() - 0.75) < 0.03
  # Mixing happens per example, not per batch.
  assert 0 < has_actions[:8].sum() < 8 or 0 < has_actions[8:16].sum() < 16
  # The manifest's two garbage images are skipped and counted, once per pass over the manifest.
  passes = (~has_actions).sum() / 10
  assert iterator.drop_counts["corrupt_image"] == pytest.approx(2 * passes, abs=2)


def test_vlm_examples_in_the_batch_follow_the_contract(data):
  iterator = make(data, [{"kind": "jsonl", "path": data["manifest"], "weight": 1.0}])
  batch = next(iterator)
  obs = batch.observation
  vlm = ~obs.has_actions
  assert vlm.any() and obs.has_actions.any()
  assert np.all(obs.image_masks["left_wrist_0_rgb"] == obs.has_actions)
  assert np.all(obs.image_masks["base_0_rgb"])
  assert not obs.images["left_wrist_0_rgb"][vlm].any()
  assert not batch.actions[vlm].any() and not obs.state[vlm].any()
  prompt_tokenizer = data["tokenizer"].prompt_tokenizer
  for row in np.flatnonzero(vlm):
    answer = obs.tokenized_prompt[row][obs.token_loss_mask[row]]
    assert prompt_tokenizer.decode(answer[:-1]) == "red"


def test_tfds_vlm_source_reads_configured_features(data):
  iterator = iter(
    sources.tfds_vlm_examples(
      data["tfds"], image_key="picture", prompt_key="question", answer_key="caption"
    )
  )
  examples = [next(iterator) for _ in range(TFDS_EXAMPLES)]
  assert sorted(e["prompt"] for e in examples) == sorted(
    f"what is shown in picture {i}?" for i in range(TFDS_EXAMPLES)
  )
  assert all(e["answer"] == "blue" and e["image"][:2] == b"\xff\xd8" for e in examples)
  with pytest.raises(ValueError, match="no feature 'image'"):
    sources.tfds_vlm_examples(data["tfds"])


def test_three_way_mixture_with_a_tfds_source(data):
  tfds_entry = {
    "kind": "tfds",
    "path": data["tfds"],
    "weight": 1.0,
    "image_key": "picture",
    "prompt_key": "question",
    "answer_key": "caption",
  }
  jsonl_entry = {"kind": "jsonl", "path": data["manifest"], "weight": 1.0}
  iterator = make(data, [jsonl_entry, tfds_entry], robot_weight=2.0)
  answers = {"red": 0, "blue": 0}
  robot = 0
  prompt_tokenizer = data["tokenizer"].prompt_tokenizer
  for _ in range(10):
    obs = next(iterator).observation
    robot += int(obs.has_actions.sum())
    for row in np.flatnonzero(~obs.has_actions):
      answer = obs.tokenized_prompt[row][obs.token_loss_mask[row]][:-1]
      answers[prompt_tokenizer.decode(answer)] += 1
  assert robot == pytest.approx(40, abs=3)
  assert answers["red"] == pytest.approx(20, abs=3) and answers["blue"] == pytest.approx(20, abs=3)


def test_single_shard_tfds_source_is_split_by_record_across_hosts(data):
  prompts = []
  for host in range(2):
    examples = sources.tfds_vlm_examples(
      data["tfds"],
      image_key="picture",
      prompt_key="question",
      answer_key="caption",
      process_index=host,
      process_count=2,
    )
    iterator = iter(examples)
    prompts.append({next(iterator)["prompt"] for _ in range(TFDS_EXAMPLES // 2)})
  assert len(prompts[0]) == len(prompts[1]) == TFDS_EXAMPLES // 2
  assert not prompts[0] & prompts[1]


def test_robot_weight_zero_trains_on_the_vlm_sources_alone(data):
  iterator = make(
    data, [{"kind": "jsonl", "path": data["manifest"], "weight": 1.0}], robot_weight=0.0
  )
  has_actions = np.concatenate([next(iterator).observation.has_actions for _ in range(4)])
  assert not has_actions.any()
  with pytest.raises(ValueError, match="robot_weight"):
    make(data, [], robot_weight=0.0)


def test_make_streams_gives_the_train_iterator_and_fresh_eval_sets(data):
  data_config = pipeline.default_config()
  data_config.update(
    dict(
      arrayrecord_dir=data["robot"],
      eval_arrayrecord_dir=data["robot"],
      vlm_sources=({"kind": "jsonl", "path": data["manifest"], "weight": 1.0},),
    )
  )
  config = ml_collections.ConfigDict(
    dict(
      seed=0,
      batch_size=8,
      data=data_config,
      eval=dict(every=10, batch_size=4, vlm_heldout=data["manifest"]),
    )
  )
  streams = pipeline.make_streams(
    config,
    fixtures.model_config(),
    data["tokenizer"],
    data["stats"],
    process_index=1,
    process_count=2,
  )
  batch = next(streams.train)
  assert isinstance(batch, Batch) and batch.actions.shape[0] == 4  # 8 over 2 hosts
  assert sorted(streams.eval_sets) == ["robot", "vlm"]
  robot = list(streams.eval_sets["robot"]())
  assert robot and all(b.observation.has_actions.all() for b in robot)
  # Host 1 of 2 reads 5 of the manifest's 12 examples (its one garbage image is skipped): two
  # batches of 2; every call reads the set afresh.
  vlm = [list(streams.eval_sets["vlm"]()) for _ in range(2)]
  assert len(vlm[0]) == 2 and vlm[0][0].actions.shape[0] == 2
  assert not vlm[0][0].observation.has_actions.any()
  jax.tree.map(np.testing.assert_array_equal, vlm[0], vlm[1])
  config.eval.every = 0
  assert (
    pipeline.make_streams(
      config,
      fixtures.model_config(),
      data["tokenizer"],
      data["stats"],
      process_index=0,
      process_count=1,
    ).eval_sets
    == {}
  )
