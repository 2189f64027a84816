"""Tiny model and optimizer settings shared by the trainer tests: compile in seconds on a CPU."""

from ki.model import pi05


def tiny_model_config(**overrides) -> pi05.Config:
  fields = dict(
    vlm_variant="tiny",
    expert_variant="tiny",
    siglip_variant="mu/16",
    image_size=32,
    action_dim=16,
    data_action_dim=8,
    action_horizon=4,
    max_token_len=24,
    max_loss_tokens=12,
    vocab_size=256,
    dtype="float32",
    remat_policy="none",
  )
  fields.update(overrides)
  return pi05.Config(**fields).validate()


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
    clip_norm=1.0,
    frozen=False,
  )
  settings.update(overrides)
  return settings


def tiny_train_config(**overrides):
  """The smoke experiment shrunk further, fed by FakeIterator instead of the pipeline."""
  from experiments import droid_ki  # pylint: disable=g-import-not-at-top

  config = droid_ki.get_config("smoke")
  config.unlock()
  model = tiny_model_config()
  config.model.update({k: getattr(model, k) for k in config.model})
  config.data = None
  config.assets = None
  config.synthetic_data.dir = ""
  config.compilation_cache_dir = ""
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


def fake_iterator(config, **overrides):
  from tests.train.fake_data import FakeIterator  # pylint: disable=g-import-not-at-top

  fields = dict(
    batch_size=config.batch_size,
    action_dim=config.model.action_dim,
    action_horizon=config.model.action_horizon,
    max_token_len=config.model.max_token_len,
    vocab_size=config.model.vocab_size,
    data_action_dim=config.model.data_action_dim,
    image_size=config.model.image_size,
  )
  fields.update(overrides)
  return FakeIterator(**fields)
