"""The training loop: exact resume, non-finite loss, configuration errors. SIGTERM and the other
faults with real processes: tests/train/test_faults.py."""

import json
import logging

import jax
import numpy as np
import pytest

from ki import checkpoint as checkpoint_lib
from ki.data.transforms import DROP_REASONS
from ki.train import resume, sharding
from ki.train import setup as setup_lib
from ki.train import trainer as trainer_lib
from tests.train.fake_data import FakeIterator
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
  with pytest.raises(resume.ResumeConfigError, match=r"seed: 0 in the checkpoint, 1 now") as error:
    make_trainer(config, tmp_path / "run")
  assert "init.path=" in str(error.value)
  # Nothing was lost: the checkpoint is still there, and the same settings resume from it.
  second, resumed = _train(tmp_path / "run", 4)
  assert second.start_step == 2 and sorted(resumed) == [3, 4]


def test_resume_with_a_changed_state_structure_is_refused_before_restoring(
  tmp_path, compilation_cache, monkeypatch, caplog
):
  """Another model width, EMA on, LoRA adapters, a frozen group, the clip off or moved into the
  groups: each breaks the train state's structure, so orbax would fail on every checkpoint and
  the run would call them all damaged. Refused up front instead, naming each; nothing restored,
  called damaged or moved."""
  _train(tmp_path / "run", 2)
  checkpoints = tmp_path / "run" / "checkpoints"
  before = sorted(p.name for p in checkpoints.iterdir())
  changed = tiny_train_config(
    total_steps=4,
    **{
      "model.vlm_variant": "dummy",
      "model.expert_variant": "dummy",
      "model.vlm_lora_rank": 2,
      "optimizer.ema_decay": 0.999,
      "optimizer.groups.action_expert.frozen": True,
      "optimizer.clip_norm": 0.0,
      "optimizer.clip": "per_group",
    },
  )

  def must_not_restore(*args, **kwargs):
    raise AssertionError("a checkpoint was restored")

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint_lib.Checkpointer, "restore", must_not_restore)
    with pytest.raises(resume.ResumeConfigError) as error:
      make_trainer(changed, tmp_path / "run")
  message = str(error.value)
  for line in (
    "model.vlm_variant: 'tiny' in the checkpoint, 'dummy' now",
    "model.expert_variant: 'tiny' in the checkpoint, 'dummy' now",
    "model.vlm_lora_rank: 0 in the checkpoint, 2 now",
    "optimizer.ema_decay: None in the checkpoint, 0.999 now",
    "optimizer.groups.action_expert.frozen: False in the checkpoint, True now",
    "optimizer.clip_norm: 1.0 in the checkpoint, 0.0 now",
    "optimizer.clip: 'global' in the checkpoint, 'per_group' now",
  ):
    assert f"\n  {line} (" in message, message
  assert f"--config.init.kind=ki --config.init.path={checkpoints / '2'}" in message
  assert "damaged" not in message.lower()
  assert sorted(p.name for p in checkpoints.iterdir()) == before
  assert not (tmp_path / "run" / checkpoint_lib.DAMAGED_DIR).exists()

  # Safe changes resume, logged once.
  safe = tiny_train_config(
    total_steps=8,
    log_every=4,
    **{"optimizer.groups.vlm.peak_lr": 5e-4, "optimizer.clip_norm": 0.5, "checkpoint.every": 4},
  )
  with caplog.at_level(logging.INFO):
    trainer = make_trainer(safe, tmp_path / "run")
  trainer.close()
  assert trainer.start_step == 2
  [logged] = [r.getMessage() for r in caplog.records if "with changed settings" in r.getMessage()]
  assert logged.startswith("Checkpoint 2: resuming with changed settings:\n  ")
  for line in (
    "total_steps: 2 in the checkpoint, 8 now",
    "optimizer.groups.vlm.peak_lr: 0.001 in the checkpoint, 0.0005 now",
    "optimizer.clip_norm: 1.0 in the checkpoint, 0.5 now",
    "log_every: 2 in the checkpoint, 4 now",
    "checkpoint.every: 2 in the checkpoint, 4 now",
  ):
    assert f"\n  {line}" in logged, logged


class _CountingIterator(FakeIterator):
  """FakeIterator with the pipeline's drop counters (all zero: nothing is dropped)."""

  def metrics(self):
    return {f"data/dropped/{reason}": 0 for reason in DROP_REASONS}


def test_every_drop_counter_is_written_from_the_first_step(tmp_path, compilation_cache):
  config = tiny_train_config(total_steps=4)  # the resume test's setup: compiled once
  assert config.log_every == 2
  iterator = _CountingIterator(setup_lib.training_model(config), batch_size=config.batch_size)
  trainer = make_trainer(config, tmp_path, iterator)
  written = {}
  write = trainer.metrics.write
  trainer.metrics.write = lambda step, extra=None: written.setdefault(step, write(step, extra))
  trainer.run()
  trainer.close()
  assert sorted(written) == [1, 2, 4]
  for reason in DROP_REASONS:
    assert written[1][f"data/dropped/{reason}"] == 0, reason


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


class _DroppingIterator:
  """FakeIterator whose totals of too-long examples grow by `per_batch` with each batch, from
  `carried` (what a resumed iterator restores: the run's totals since its start)."""

  def __init__(self, parent, *, carried: int, per_batch: int):
    self.parent, self.per_batch = parent, per_batch
    self.drop_counts = {"too_long": carried}

  def __iter__(self):
    return self

  def __next__(self):
    self.drop_counts = {"too_long": self.drop_counts["too_long"] + self.per_batch}
    return next(self.parent)

  def get_state(self):
    return self.parent.get_state()

  def set_state(self, state):
    self.parent.set_state(state)


def test_too_many_overlong_examples_are_refused(tmp_path):
  config = tiny_train_config()
  iterator = _DroppingIterator(fake_iterator(config), carried=0, per_batch=5)
  trainer = make_trainer(config, tmp_path, iterator)
  with pytest.raises(ValueError, match="5 of the first 13 examples .* raise model.max_token_len"):
    trainer.run()
  trainer.close()


def test_drops_carried_by_a_resumed_stream_do_not_refuse_it(tmp_path, compilation_cache):
  """A resumed iterator restores its totals since the start of training (50 over many batches);
  only what its first batch dropped counts (it refused every such resume before)."""
  config = tiny_train_config(total_steps=1)
  iterator = _DroppingIterator(fake_iterator(config), carried=50, per_batch=0)
  trainer = make_trainer(config, tmp_path, iterator)
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
