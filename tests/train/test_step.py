"""The pure train step: gradient accumulation mechanics, loss weighting, EMA, and the same losses
on 1 device and on an 8-device (data=2, fsdp=4) mesh."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ki.model import params as params_lib
from ki.model import pi05
from ki.train import optimizer, sharding
from ki.train import setup as setup_lib
from ki.train import state as state_lib
from ki.train import step as step_lib
from tests.train.fake_data import FakeIterator
from tests.train.tiny import group_settings, tiny_model_config, tiny_train_config


def _quadratic_losses(params, config, observation, actions, rng):
  """A stand-in for pi05.compute_losses that ignores rng, so accumulation is exactly testable.
  Like the model, each term is 0 for examples that do not carry it."""
  del config, rng
  x = observation.state
  has_tokens = jnp.any(observation.token_loss_mask, axis=-1)
  flow = jnp.sum(jnp.square(x @ params["action_in_proj"]["kernel"] - actions[:, 0]), axis=-1)
  fast = jnp.sum(jnp.square((x + 1.0) * params["PaliGemma"]["w"]), axis=-1)
  return {
    "flow_mse": flow * observation.has_actions,
    "token_ce": fast * has_tokens,
    "token_accuracy": jnp.zeros_like(fast),
  }


def _toy_params():
  return {
    "PaliGemma": {"w": jnp.linspace(0.5, 1.5, 8)},
    "action_in_proj": {"kernel": jnp.eye(8) * 0.5},
  }


def _toy_batch(**model_overrides):
  """8 examples of the toy's width: 6 robot examples, VLM examples at indices 3 and 7."""
  model = tiny_model_config(action_dim=8, action_horizon=2, **model_overrides)
  batch = FakeIterator(model, batch_size=8, seed=1).batch(0)
  # The robot examples' states differ from each other and from the VLM examples' (zero) states.
  assert list(batch.observation.has_actions) == [True, True, True, False] * 2
  return batch


def _toy_setup(monkeypatch, **settings):
  monkeypatch.setattr(pi05, "compute_losses", _quadratic_losses)
  params = _toy_params()
  rules = (("action_in_proj/.*", "action_expert"), ("PaliGemma/.*", "vlm"))
  config = ml_collections.ConfigDict(
    dict(
      group_rules=rules,
      groups=dict(vlm=group_settings(), action_expert=group_settings()),
      clip_norm=1.0,
      clip="global",
    )
  )
  opt = optimizer.make_optimizer(config, params)
  state = state_lib.state_from_params(
    params, jax.random.PRNGKey(0), tx=opt.tx, use_ema=settings.get("ema_decay") is not None
  )
  step_settings = step_lib.StepSettings(model=tiny_model_config(), **settings)
  step = jax.jit(functools.partial(step_lib.train_step, step_settings, opt))
  return step, state, _toy_batch()


def _all_robot(batch):
  observation = batch.observation.replace(has_actions=np.ones(8, bool))
  return batch.replace(observation=observation)


def test_grad_accumulation_matches_one_big_batch(monkeypatch):
  # Every example carries both losses, so the micro-batch means average to the batch mean.
  step, state, batch = _toy_setup(monkeypatch)
  batch = _all_robot(batch)
  reference, reference_metrics = step(state, batch)
  step4, state4, _ = _toy_setup(monkeypatch, grad_accum_steps=4)
  accumulated, metrics = step4(state4, batch)
  for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(
    metrics["grad_norm/vlm"], reference_metrics["grad_norm/vlm"], rtol=1e-5
  )


def test_grad_accumulation_averages_each_micro_batch_mean(monkeypatch):
  monkeypatch.setattr(pi05, "compute_losses", _quadratic_losses)
  params, batch = _toy_params(), _toy_batch()
  one = step_lib.StepSettings(model=tiny_model_config())
  two = step_lib.StepSettings(model=tiny_model_config(), grad_accum_steps=2)
  grads, metrics = step_lib._grads_and_metrics(params, {}, two, batch, jax.random.key(0))
  # Micro-batch i holds examples i, i + 2, ...: here 4 robot examples, then 2 robot + 2 VLM.
  micro_batches = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  parts = [step_lib._grads_and_metrics(params, {}, one, micro, None) for micro in micro_batches]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
  for a, b in zip(jax.tree.leaves((grads, metrics)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_each_loss_is_averaged_over_the_examples_that_carry_it(monkeypatch):
  """VLM co-training examples must not dilute the flow term (pi05_flow_only, vlm_frozen keep
  them with the token loss off), nor robot examples without loss tokens the token term."""
  monkeypatch.setattr(pi05, "compute_losses", _quadratic_losses)
  params = _toy_params()
  flow_only = step_lib.StepSettings(model=tiny_model_config(), flow_weight=1.0, token_weight=0.0)
  batch = _toy_batch()
  robot = np.asarray(batch.observation.has_actions)

  def robot_flow_mean(p):
    losses = _quadratic_losses(p, None, batch.observation, batch.actions, None)
    return jnp.mean(losses["flow_mse"][robot])

  grads, metrics = step_lib._grads_and_metrics(params, {}, flow_only, batch, None)
  np.testing.assert_allclose(metrics["loss"], robot_flow_mean(params), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(robot_flow_mean)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # Flow-only data (no FAST postfix): only the VLM examples have loss tokens.
  batch = _toy_batch(fast_loss=False)
  has_tokens = np.asarray(batch.observation.token_loss_mask).any(axis=-1)
  np.testing.assert_array_equal(has_tokens, ~batch.observation.has_actions)
  settings = step_lib.StepSettings(model=tiny_model_config(), flow_weight=0.5, token_weight=2.0)
  _, metrics = step_lib._grads_and_metrics(params, {}, settings, batch, None)
  losses = _quadratic_losses(params, None, batch.observation, batch.actions, None)
  flow = np.mean(losses["flow_mse"][np.asarray(batch.observation.has_actions)])
  fast = np.mean(losses["token_ce"][has_tokens])
  np.testing.assert_allclose(metrics["flow_mse"], flow, rtol=1e-6)
  np.testing.assert_allclose(metrics["token_ce"], fast, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], 0.5 * flow + 2.0 * fast, rtol=1e-6)


def test_loss_weights_and_logged_terms(monkeypatch):
  step, state, batch = _toy_setup(monkeypatch, flow_weight=0.0, token_weight=2.0)
  _, metrics = step(state, batch)
  losses = _quadratic_losses(state.params, None, batch.observation, batch.actions, None)
  np.testing.assert_allclose(metrics["loss"], 2.0 * np.mean(losses["token_ce"]), rtol=1e-5)
  # flow_mse is logged as the mean over robot examples only.
  has_actions = batch.observation.has_actions
  np.testing.assert_allclose(
    metrics["flow_mse"], np.mean(losses["flow_mse"][has_actions]), rtol=1e-5
  )
  # With flow_weight 0 the expert's only parameter gets no gradient.
  assert float(metrics["grad_norm/action_expert"]) == 0.0
  assert float(metrics["grad_norm/vlm"]) > 0.0
  assert set(metrics) >= {"learning_rate/vlm", "update_norm/action_expert", "param_norm"}


def test_ema_tracks_params(monkeypatch):
  step, state, batch = _toy_setup(monkeypatch, ema_decay=0.5)
  new_state, _ = step(state, batch)
  expected = jax.tree.map(lambda old, new: 0.5 * old + 0.5 * new, state.params, new_state.params)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.ema_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(new_state.step) == 1


def _run_tiny(mesh_config, devices, steps=2):
  config = tiny_train_config(mesh=mesh_config, batch_size=8)
  setup = setup_lib.make_setup(config, devices=devices)
  state = setup.init_state()
  iterator = FakeIterator(setup.model_config, batch_size=8)
  losses = []
  for _ in range(steps):
    state, metrics = setup.step(state, sharding.global_batch(next(iterator), setup.mesh))
    losses.append({k: float(metrics[k]) for k in ("loss", "flow_mse", "token_ce")})
  return losses, state


# tests/train/test_clip_insulation.py's global-clip run is this 1-device step: in one process, the
# second compile is a read from the persistent compilation cache.
@pytest.mark.xdist_group("tiny_step_1_device")
@pytest.mark.slow
def test_fsdp_on_8_devices_gives_the_same_losses_as_1_device(compilation_cache):
  single, _ = _run_tiny((("data", 1), ("fsdp", 1)), jax.devices()[:1])
  sharded, state = _run_tiny((("data", 2), ("fsdp", 4)), None)
  # The FSDP rule really split something.
  specs = {leaf.sharding.spec for leaf in jax.tree.leaves(state.params)}
  assert any("fsdp" in spec for spec in specs)
  for a, b in zip(single, sharded):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=key)


def _lora_toy_losses(params, config, observation, actions, rng):
  """A quadratic stand-in for the model with the LoRA layout: each stream's frozen base weight W
  adapted by a @ b; the VLM stream gives the token term, the expert stream the flow term. The
  trainable non-adapter leaves enter scaled by 0.01, so the base's gradient dominates."""
  del config, rng
  llm = params["PaliGemma"]["llm"]["layers"]
  x = observation.state[:, :4]
  vlm = llm["mlp"]["linear"] + llm["mlp"]["linear_lora_a"] @ llm["mlp"]["linear_lora_b"]
  expert = llm["mlp_1"]["linear"] + llm["mlp_1"]["linear_lora_a"] @ llm["mlp_1"]["linear_lora_b"]
  token = jnp.sum(jnp.square(x @ vlm + 0.01 * params["PaliGemma"]["img"]["w"]), axis=-1)
  prediction = x @ expert + 0.01 * x @ params["action_in_proj"]["kernel"]
  flow = jnp.sum(jnp.square(prediction - actions[:, 0, :4]), axis=-1)
  return {
    "flow_mse": flow * observation.has_actions,
    "token_ce": token * jnp.any(observation.token_loss_mask, axis=-1),
    "token_accuracy": jnp.zeros_like(token),
  }


def _lora_toy_params():
  rng = np.random.default_rng(0)

  def draw(*shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

  # Large base weights and small adapters (as LoRA's init): the base's gradient dwarfs theirs.
  mlp = lambda: {"linear": draw(4, 4), "linear_lora_a": draw(4, 1, scale=0.01)}  # noqa: E731
  tree = {
    "PaliGemma": {
      "llm": {"layers": {"mlp": mlp(), "mlp_1": mlp()}},
      "img": {"w": draw(4)},
    },
    "action_in_proj": {"kernel": draw(4, 4)},
  }
  for stream in ("mlp", "mlp_1"):
    tree["PaliGemma"]["llm"]["layers"][stream]["linear_lora_b"] = draw(1, 4, scale=0.01)
  return tree


def test_lora_clips_by_the_trainable_gradients_only(monkeypatch):
  """With the pi05_lora rules the frozen base is not differentiated: the global clip norm is the
  trainable leaves' (adapters, SigLIP stand-in, projection), and the update equals AdamW applied
  to those gradients alone, clipped by their own norm. Including the base's huge gradient in the
  norm would shrink the adapters' step (here it would clip; the trainable norm alone does not)."""
  monkeypatch.setattr(pi05, "compute_losses", _lora_toy_losses)
  params = _lora_toy_params()
  # Adam's eps of the order of the gradients makes its step depend on the gradient's scale, so a
  # wrong clip factor shows in the update (with a tiny eps Adam's first step is ~lr * sign(g)).
  group = group_settings(peak_lr=1.0, warmup_steps=0, eps=1.0, weight_decay=0.0)
  groups = {g: group for g in ("vlm", "vlm_lora", "action_expert", "action_expert_lora")}
  config = ml_collections.ConfigDict(
    dict(
      group_rules="pi05_lora",
      groups=dict(groups, frozen=dict(group, frozen=True)),
      clip_norm=None,
      clip="global",
    )
  )
  batch = _toy_batch()

  def loss(p):
    return step_lib.loss_and_metrics(
      p, step_lib.StepSettings(model=tiny_model_config()), batch, None
    )[0]

  every_grad = params_lib.flatten(jax.grad(loss)(params))
  labels = params_lib.flatten(optimizer.label_params(params, params_lib.group_rules("pi05_lora")))
  trainable_grads = {n: g for n, g in every_grad.items() if labels[n] != "frozen"}
  trainable_norm = float(optax.global_norm(trainable_grads))
  every_norm = float(optax.global_norm(every_grad))
  assert every_norm > 10 * trainable_norm  # the case discriminates
  config.clip_norm = 2.0 * trainable_norm  # above the trainable norm, far below the full one

  opt = optimizer.make_optimizer(config, params)
  state = state_lib.state_from_params(params, jax.random.PRNGKey(0), tx=opt.tx, use_ema=False)
  settings = step_lib.StepSettings(model=tiny_model_config())
  new_state, metrics = jax.jit(functools.partial(step_lib.train_step, settings, opt))(state, batch)

  np.testing.assert_allclose(metrics["grad_norm"], trainable_norm, rtol=1e-5)
  assert not any(k.endswith("/frozen") for k in metrics if k.startswith(("grad_", "update_")))
  # The reference: plain AdamW on the trainable leaves' gradients, unclipped (under the clip).
  trainable = {n: x for n, x in params_lib.flatten(params).items() if labels[n] != "frozen"}
  adam = optax.adamw(
    optimizer.make_schedule(ml_collections.ConfigDict(group)),
    **{k: group[k] for k in ("b1", "b2", "eps", "weight_decay")},
  )
  updates, _ = adam.update(trainable_grads, adam.init(trainable), trainable)
  before, after = params_lib.flatten(params), params_lib.flatten(new_state.params)
  for name, update in updates.items():
    np.testing.assert_allclose(
      after[name] - before[name], update, rtol=1e-4, atol=1e-6, err_msg=name
    )
  # Had the base's gradient counted, every step would have been scaled by clip / every_norm.
  scaled = {n: g * config.clip_norm / every_norm for n, g in trainable_grads.items()}
  wrong, _ = adam.update(scaled, adam.init(trainable), trainable)
  for name in (
    "PaliGemma/llm/layers/mlp/linear_lora_a",
    "PaliGemma/llm/layers/mlp_1/linear_lora_b",
  ):
    assert not np.allclose(after[name] - before[name], wrong[name], rtol=0.1), name
  # The frozen base is exactly where it was.
  for name in (n for n, g in labels.items() if g == "frozen"):
    np.testing.assert_array_equal(after[name], before[name])
