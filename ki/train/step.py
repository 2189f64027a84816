"""The pure train step: one forward for both losses, optional gradient accumulation, per-group
gradient/update norms.

`train_step` is a module-level function of (settings, optimizer, state, batch); the trainer binds
the first two with functools.partial and jits it once with explicit shardings and a donated
state. Everything that branches (accumulation, EMA, loss weights) is fixed by the settings at
trace time.

Only the trainable parameters are differentiated: the step splits the params by the optimizer's
groups (`Optimizer.split`) and takes the gradient with respect to the trainable part, the frozen
part (a LoRA run's base weights, a frozen VLM) entering the loss as a constant. So no gradient is
computed or stored for a frozen leaf, and the clip sees the trainable gradients only.
The same code runs every config; with no frozen group the frozen part is empty.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ki.batch import Batch
from ki.model import pi05
from ki.train import optimizer as optimizer_lib
from ki.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step needs from the experiment config (hashable, so it can be static)."""

  model: pi05.Config
  # total = flow_weight * mean flow_mse (over robot examples) + token_weight * mean token_ce (over
  # examples with loss tokens); see loss_and_metrics. The KI paper uses 1 and 1 (alpha = 1 once
  # the stop-gradient insulates the VLM).
  flow_weight: float = 1.0
  token_weight: float = 1.0
  # The batch is split into this many micro-batches whose gradients are averaged.
  grad_accum_steps: int = 1
  ema_decay: float | None = None


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values [B] over examples where mask [B] is True (0 when none)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_and_metrics(params, settings: StepSettings, batch: Batch, rng):
  """Total loss (scalar) and its terms for one (micro-)batch.

  Each loss is averaged over the examples that carry it, then weighted:
    loss = flow_weight * mean(flow_mse over examples with actions)
         + token_weight * mean(token_ce over examples with any loss token)
  so co-training (VLM) examples do not dilute the flow term, nor robot examples without a FAST
  postfix the token term. A batch without any such example contributes 0 for that term. The
  logged token_ce / token_accuracy / flow_mse are the same means.
  """
  losses = pi05.compute_losses(params, settings.model, batch.observation, batch.actions, rng)
  has_tokens = jnp.any(batch.observation.token_loss_mask, axis=-1)
  metrics = {
    "flow_mse": _masked_mean(losses["flow_mse"], batch.observation.has_actions),
    "token_ce": _masked_mean(losses["token_ce"], has_tokens),
    "token_accuracy": _masked_mean(losses["token_accuracy"], has_tokens),
  }
  metrics["loss"] = settings.flow_weight * metrics["flow_mse"] + (
    settings.token_weight * metrics["token_ce"]
  )
  return metrics["loss"], metrics


def _split_micro_batches(batch, num: int):
  """[B, ...] -> [num, B / num, ...], micro-batch i holding examples i, i + num, ...

  Taking every num-th example keeps each device's rows on that device: a device's contiguous
  block of B rows becomes a contiguous block along the second axis, so no data moves.
  """

  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def _trainable_loss(trainable, frozen, settings: StepSettings, batch: Batch, rng):
  """loss_and_metrics of the whole params, as a function of their trainable part."""
  params = optimizer_lib.Optimizer.combine(trainable, frozen)
  return loss_and_metrics(params, settings, batch, rng)


def _grads_and_metrics(trainable, frozen, settings: StepSettings, batch: Batch, rng):
  """Gradients of the trainable part (a tree shaped like it; nothing for `frozen`) and metrics,
  averaged over micro-batches (each micro-batch's means, averaged)."""
  grad_fn = jax.grad(_trainable_loss, has_aux=True)  # argument 0 only: frozen is a constant
  if settings.grad_accum_steps == 1:
    return grad_fn(trainable, frozen, settings, batch, rng)

  micro_batches = _split_micro_batches(batch, settings.grad_accum_steps)

  def accumulate(carry, xs):
    index, micro_batch = xs
    rng_i = jax.random.fold_in(rng, index)
    grads, metrics = grad_fn(trainable, frozen, settings, micro_batch, rng_i)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  first = jax.tree.map(lambda x: x[0], micro_batches)
  zero_metrics = jax.eval_shape(lambda: grad_fn(trainable, frozen, settings, first, rng)[1])
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics)
  indices = jnp.arange(settings.grad_accum_steps)
  (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics), (indices, micro_batches))
  scale = 1.0 / settings.grad_accum_steps
  return jax.tree.map(lambda x: x * scale, (grads, metrics))


def train_step(
  settings: StepSettings,
  optimizer: optimizer_lib.Optimizer,
  state: TrainState,
  batch: Batch,
) -> tuple[TrainState, dict]:
  """One optimizer update. batch: a ki.batch.Batch of global arrays [B, ...].

  Returns the new state and scalar metrics: loss terms, learning rate per group, gradient and
  update norm per trainable group (`grad_norm/<group>`: the norm a per-group clip uses), the
  global gradient norm (`grad_norm`: trainable leaves only, the norm the global clip uses),
  parameter norm (all leaves). Gradient norms are before clipping.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  trainable, frozen = optimizer.split(state.params)
  grads, metrics = _grads_and_metrics(trainable, frozen, settings, batch, rng)
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  params = optimizer.combine(trainable, frozen)

  labels, _ = optimizer.split(optimizer.labels)
  for group, norm in optimizer_lib.group_norms(grads, labels).items():
    metrics[f"grad_norm/{group}"] = norm
  for group, norm in optimizer_lib.group_norms(updates, labels).items():
    metrics[f"update_norm/{group}"] = norm
  for group, schedule in optimizer.schedules.items():
    metrics[f"learning_rate/{group}"] = schedule(state.step)
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["param_norm"] = optax.global_norm(params)

  ema_params = state.ema_params
  if settings.ema_decay is not None:
    # Only the trainable leaves move; the frozen ones' average stays bit-equal to them (a
    # decay * p + (1 - decay) * p in floating point need not round back to p).
    decay = settings.ema_decay
    ema_trainable, ema_frozen = optimizer.split(ema_params)
    ema_trainable = jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p, ema_trainable, trainable
    )
    ema_params = optimizer.combine(ema_trainable, ema_frozen)
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
  )
  return new_state, metrics
