"""Tiny model and optimizer settings shared by the trainer tests: compile in seconds on a CPU."""

from ki.model import pi05


def tiny_model_config(**overrides) -> pi05.Config:
  fields = dict(
    vlm_variant="tiny", expert_variant="tiny", siglip_variant="mu/16", image_size=32,
    action_dim=16, data_action_dim=8, action_horizon=4, max_token_len=24, max_loss_tokens=12,
    vocab_size=256, dtype="float32", remat_policy="none",
  )
  fields.update(overrides)
  return pi05.Config(**fields).validate()


def group_settings(**overrides) -> dict:
  settings = dict(peak_lr=1e-3, warmup_steps=2, decay_steps=100, end_lr=1e-4, b1=0.9, b2=0.95,
                  eps=1e-8, weight_decay=1e-10, clip_norm=1.0, frozen=False)
  settings.update(overrides)
  return settings
