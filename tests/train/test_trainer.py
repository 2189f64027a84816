"""The training loop: exact resume, non-finite loss, configuration errors. SIGTERM and the other
faults with real processes: tests/train/test_faults.py."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from ki.train import setup as setup_lib
from ki.train import sharding
from ki.train import trainer as trainer_lib
from tests.train.tiny import fake_iterator, make_trainer, tiny_train_config

# One xdist worker runs these and tests/train/test_faults.py, so the in-process trainers and the
# subprocesses share the compiled train step through the compilation cache.
pytestmark = pytest.mark.xdist_group("tiny_trainer")


def _train(workdir, total_steps, **iterator_overrides):
  config = tiny_train_config(total_steps=total_steps)
  trainer = make_trainer(config, workdir, fake_iterator(config, **iterator_overrides))
  history = trainer.run()
  trainer.close()
  return trainer, history


def test_resume_is_exact(tmp_path, compilation_cache):
  _, straight = _train(tmp_path / "straight", 4)
  first, _ = _train(tmp_path / "resumed", 2)
  assert first.checkpointer.latest_step() == 2
  second, resumed = _train(tmp_path / "resumed", 4)  # a new Trainer: restores step 2
  assert second.start_step == 2
  assert sorted(resumed) == [3, 4]
  for step in (3, 4):
    for key in ("loss", "token_ce", "flow_mse", "grad_norm"):
      np.testing.assert_allclose(
        resumed[step][key], straight[step][key], rtol=1e-5, err_msg=f"{key} at step {step}"
      )
  # The serving item and the assets are in the checkpoint too.
  assert (tmp_path / "resumed" / "checkpoints" / "4" / "params").is_dir()
  assert json.loads(second.checkpointer.restore_assets(4)["config.json"])["total_steps"] == 4


def test_resume_with_other_data_settings_is_refused(tmp_path, compilation_cache):
  first, _ = _train(tmp_path / "run", 2)
  config = tiny_train_config(total_steps=4, seed=1)  # the seed orders the data stream
  with pytest.raises(ValueError, match=r"seed: 0 in the checkpoint, 1 now") as error:
    make_trainer(config, tmp_path / "run")
  assert "init.path=" in str(error.value)
  # Nothing was lost: the checkpoint is still there, and the same settings resume from it.
  second, resumed = _train(tmp_path / "run", 4)
  assert second.start_step == 2 and sorted(resumed) == [3, 4]


def test_resumable_compares_only_the_data_stream_fields():
  saved = tiny_train_config().to_dict()
  saved["data"] = {"num_workers": 0, "vlm_sources": [], "robot_weight": 1.0}
  saved_json = ml_collections.ConfigDict(saved).to_json_best_effort()
  # Step counts, logging and the like may change on resume.
  trainer_lib.check_resumable(
    saved_json,
    ml_collections.ConfigDict(dict(saved, total_steps=99, log_every=7)).to_json_best_effort(),
    "/ckpt/2",
  )
  workers = ml_collections.ConfigDict(
    dict(saved, data=dict(saved["data"], num_workers=8))
  ).to_json_best_effort()
  with pytest.raises(ValueError, match="data.num_workers: 0 in the checkpoint, 8 now"):
    trainer_lib.check_resumable(saved_json, workers, "/ckpt/2")


class _PoisonedIterator:
  """Wraps an iterator and puts a NaN into the actions of batch `at` (0-based)."""

  def __init__(self, inner, at):
    self.inner, self.at = inner, at

  def __next__(self):
    batch = next(self.inner)
    if self.inner.index - 1 == self.at:
      batch.actions[0, 0, 0] = np.nan
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def start_prefetch(self):
    pass


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, compilation_cache):
  config = tiny_train_config(total_steps=6)
  trainer = make_trainer(config, tmp_path, _PoisonedIterator(fake_iterator(config), at=2))
  with pytest.raises(trainer_lib.NonFiniteLossError, match=r"flow_mse.* at step 3"):
    trainer.run()
  assert trainer.checkpointer.all_steps() == [2]
  trainer.close()


def test_config_errors_are_refused_before_compiling(monkeypatch):
  # Nothing may be traced before the config is refused.
  monkeypatch.setattr(setup_lib.state_lib, "abstract_params", _must_not_run)
  with pytest.raises(ValueError, match="multiple of 8"):
    setup_lib.make_setup(tiny_train_config(batch_size=12))
  with pytest.raises(ValueError, match="data_action_dim 20 > action_dim 16"):
    setup_lib.make_setup(tiny_train_config(**{"model.data_action_dim": 20}))
  with pytest.raises(ValueError, match="Loss weights must be >= 0"):
    setup_lib.make_setup(tiny_train_config(**{"loss.token_weight": -1.0}))


def _must_not_run(*args, **kwargs):
  raise AssertionError("traced before the config was checked")


def test_tokenizer_vocabulary_must_match_the_model(tmp_path):
  from ki.tokenizers import prompt  # pylint: disable=g-import-not-at-top

  model_path = prompt.build_sentencepiece_model(
    ["pick up the red cube", "put the cup on the plate"] * 20,
    str(tmp_path / "sp.model"),
    text_vocab_size=300,
  )
  config = tiny_train_config()
  config.unlock()
  config.assets.prompt_tokenizer = model_path
  model_config = setup_lib.check_config(config, sharding.make_mesh((("data", -1), ("fsdp", 1))))
  with pytest.raises(
    ValueError,
    match=r"1452 pieces but model.vocab_size=256; set "
    r"model.vocab_size to 1452",
  ):
    trainer_lib.build_tokenizer(config, model_config)


def test_too_many_overlong_examples_are_refused(tmp_path):
  config = tiny_train_config()
  iterator = fake_iterator(config)
  iterator.drop_counts = {"too_long": 5}
  trainer = make_trainer(config, tmp_path, iterator)
  with pytest.raises(ValueError, match="raise model.max_token_len"):
    trainer.run()
  trainer.close()


def test_initialises_from_a_checkpoint_of_ours(tmp_path, compilation_cache):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from ki.train import state as state_lib  # pylint: disable=g-import-not-at-top

  config = tiny_train_config()
  abstract = state_lib.abstract_params(trainer_lib.pi05.Config(**config.model))
  tree = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "pretrained" / "checkpoints" / "5" / "params", {"params": tree})
  config.unlock()
  config.init.update(dict(kind="ki", path=str(tmp_path / "pretrained")))
  trainer = make_trainer(config, tmp_path / "work")
  assert trainer.start_step == 0
  for leaf in jax.tree.leaves(trainer.state.params):
    np.testing.assert_array_equal(leaf, 0.5)
  trainer.close()
