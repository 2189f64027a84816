"""Periodic evaluation on held-out batches.

For every named eval set (an iterable of host ki.batch.Batch objects, read afresh each time; the
data side builds them: ki.data.pipeline.make_streams):
  action_mae   mean |a_pred - a| in raw action units over the real dims, with a_pred from
               sample_actions (flow decoding, `num_flow_steps` Euler steps) — robot examples only.
  fast_ce / fast_accuracy   next-token loss and accuracy on the FAST postfix of robot examples.
  flow_mse     the training flow loss on robot examples.
  text_ce / text_accuracy   the same token loss on co-training (VLM) examples: language
               retention, what knowledge insulation is meant to protect.
  text_exact_match   fraction of co-training examples whose every answer token is the argmax
               under teacher forcing: exactly the examples greedy decoding answers word for word.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ki.batch import Batch
from ki.data import normalize
from ki.model import pi05
from ki.train import sharding as sharding_lib


def eval_batch(model_config: pi05.Config, num_flow_steps: int, params, batch: Batch, rng):
  """Per-example results for one global batch: dict of [B] arrays plus predicted actions
  [B, H, action_dim] (normalised)."""
  observation = batch.observation
  loss_rng, sample_rng = jax.random.split(rng)
  losses = pi05.compute_losses(params, model_config, observation, batch.actions, loss_rng)
  predicted = pi05.sample_actions(
    params, model_config, observation, sample_rng, num_steps=num_flow_steps
  )
  return {
    "token_ce": losses["token_ce"],
    "token_accuracy": losses["token_accuracy"],
    "flow_mse": losses["flow_mse"],
    "has_tokens": jnp.any(observation.token_loss_mask, axis=-1),
    "has_actions": observation.has_actions,
    "predicted_actions": predicted,
    "actions": batch.actions,
  }


def _mean(values: np.ndarray, mask: np.ndarray) -> float:
  return float(np.sum(values * mask) / max(np.sum(mask), 1))


class Evaluator:
  """Runs eval_batch over held-out iterators and reduces to scalars on the host."""

  def __init__(
    self,
    model_config: pi05.Config,
    mesh,
    params_shardings,
    *,
    action_stats: normalize.NormStats | None,
    num_flow_steps: int = 10,
    use_quantiles: bool = True,
  ):
    self.model_config = model_config
    self.mesh = mesh
    # Token losses are evaluated even for runs trained without them (flow-only, frozen VLM): the
    # language model head is the tied embedding, so the same params give the text loss, and the
    # language-retention comparison between experiments needs it.
    eval_config = dataclasses.replace(model_config, fast_loss=True)
    self.action_stats = action_stats
    self.use_quantiles = use_quantiles
    # Outputs replicated: every host reads the whole (small) result.
    self._eval = jax.jit(
      functools.partial(eval_batch, eval_config, num_flow_steps),
      in_shardings=(
        params_shardings,
        sharding_lib.batch_sharding(mesh),
        sharding_lib.replicated(mesh),
      ),
      out_shardings=sharding_lib.replicated(mesh),
    )

  def _raw(self, actions: np.ndarray) -> np.ndarray:
    """[B, H, action_dim] normalised -> [B, H, data_action_dim] in raw units."""
    actions = actions[..., : self.model_config.data_action_dim]
    if self.action_stats is None:
      return actions
    return normalize.unnormalize(actions, self.action_stats, use_quantiles=self.use_quantiles)

  def evaluate(self, params, batches, *, rng, max_batches: int | None = None) -> dict[str, float]:
    """Scalars over up to max_batches host batches (ki.batch.Batch) of `batches` (any iterable)."""
    results = []
    for index, host_batch in enumerate(batches):
      if max_batches is not None and index >= max_batches:
        break
      batch = sharding_lib.global_batch(host_batch, self.mesh)
      results.append(jax.device_get(self._eval(params, batch, jax.random.fold_in(rng, index))))
    if not results:
      raise ValueError("The eval iterator yielded no batches; check the eval split.")
    r = {key: np.concatenate([np.asarray(x[key]) for x in results]) for key in results[0]}
    robot = r["has_actions"].astype(bool)
    robot_tokens = robot & r["has_tokens"]
    text_tokens = ~robot & r["has_tokens"]
    metrics = {"num_examples": float(len(robot))}
    if robot.any():
      error = np.abs(self._raw(r["predicted_actions"]) - self._raw(r["actions"]))
      metrics["action_mae"] = float(error[robot].mean())
      metrics["flow_mse"] = _mean(r["flow_mse"], robot)
    if robot_tokens.any():
      metrics["fast_ce"] = _mean(r["token_ce"], robot_tokens)
      metrics["fast_accuracy"] = _mean(r["token_accuracy"], robot_tokens)
    if text_tokens.any():
      metrics["text_ce"] = _mean(r["token_ce"], text_tokens)
      metrics["text_accuracy"] = _mean(r["token_accuracy"], text_tokens)
      metrics["text_exact_match"] = _mean(r["token_accuracy"] == 1.0, text_tokens)
    return metrics
