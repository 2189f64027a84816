"""Tiny model and optimizer settings shared by the trainer tests: compile in seconds on a CPU."""

from ki.model import pi05
from tests.model.tiny import tiny_config


def tiny_model_config(**overrides) -> pi05.Config:
  """tests/model/tiny.py's model with DROID's 8 action dims, shaped for the trainer tests."""
  fields = dict(
    image_size=32,
    data_action_dim=8,
    action_horizon=4,
    max_token_len=24,
    max_loss_tokens=12,
    vocab_size=256,
    remat_policy="none",
  )
  fields.update(overrides)
  return tiny_config(**fields)


def group_settings(**overrides) -> dict:
  settings = dict(
    peak_lr=1e-3,
    warmup_steps=2,
    decay_steps=100,
    end_lr=1e-4,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=1e-10,
    frozen=False,
  )
  settings.update(overrides)
  return settings


def tiny_train_config(**overrides):
  """The training config shrunk to the tiny model, for trainers fed by FakeIterator."""
  from ki.train import config as config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.default_config()
  model = tiny_model_config()
  config.model.update({k: getattr(model, k) for k in config.model})
  config.mesh = (("data", -1), ("fsdp", 1))
  config.batch_size = 8
  config.total_steps = 6
  config.fsdp_min_size_bytes = 0
  config.log_every = 2
  config.checkpoint.update(dict(every=2, max_to_keep=2, keep_period=0, asynchronous=True))
  config.eval.update(dict(every=0, batch_size=8, max_batches=1))
  for group in config.optimizer.groups.values():
    group.update(group_settings())
  if overrides:
    config.update_from_flattened_dict(overrides)
  config.lock()
  return config


_SETUPS = {}


def setup_for(config):
  """The TrainSetup of `config`, shared by every trainer of this process with the same config, so
  that the tiny step is compiled once per process (ki.train.setup caches the compiled step)."""
  from ki.train import setup as setup_lib  # pylint: disable=g-import-not-at-top

  key = config.to_json_best_effort(sort_keys=True)
  if key not in _SETUPS:
    _SETUPS[key] = setup_lib.make_setup(config)
  return _SETUPS[key]


def make_trainer(config, workdir, iterator=None, **kwargs):
  """A Trainer for `config` in `workdir`, fed by `iterator` (default: fake_iterator(config))."""
  from ki.train.trainer import Trainer  # pylint: disable=g-import-not-at-top

  iterator = fake_iterator(config) if iterator is None else iterator
  return Trainer(setup_for(config), str(workdir), iterator, **kwargs)


def fake_iterator(config, **overrides):
  """FakeIterator for this host's share of config.batch_size."""
  import jax  # pylint: disable=g-import-not-at-top

  from ki.train import setup as setup_lib  # pylint: disable=g-import-not-at-top
  from tests.train.fake_data import FakeIterator  # pylint: disable=g-import-not-at-top

  fields = dict(
    batch_size=config.batch_size // jax.process_count(), process_index=jax.process_index()
  )
  fields.update(overrides)
  return FakeIterator(setup_lib.training_model(config), **fields)
