"""The optimizer: one optax chain per parameter group, groups named by ordered regex rules.

A parameter's name is its tree path joined by "/" (e.g. "PaliGemma/llm/layers/q_einsum_1/w").
`config.optimizer.group_rules` is an ordered list of (regex, group) pairs; the first regex that
fully matches a name gives its group, and a name no rule matches is an error (big_vision's optax.py
does the same, so that a renamed parameter cannot silently fall out of training).

Each group in `config.optimizer.groups` has its own AdamW with a warmup + cosine schedule, or
`frozen=True`: a frozen group's parameters are not differentiated at all. `Optimizer.split`
partitions the params into the trainable leaves and the frozen ones; the train step takes the
gradient of the trainable part only (the frozen part is a constant to it), so a LoRA run computes
no gradient for its frozen base, keeps no optimizer state for it, and never moves it.

Gradients are clipped to the norm `config.optimizer.clip_norm` (0 = no clip), in one of two
structures, `config.optimizer.clip` (CLIPS):
  "global"     the gradient of all trainable parameters together, before the groups (openpi, which
               also differentiates only the trainable subset): one scale for the whole model, so a
               gradient spike in one group also damps the other's step.
  "per_group"  each group's gradient by its own norm, first in that group's chain: a group's step
               depends on its own gradient only. Under knowledge insulation the VLM's gradient is
               the token loss's alone, and with this clip so is its update: KI's VLM then trains
               exactly as a token-loss-only (pi0-FAST) run's would on the same batches
               (tests/train/test_clip_insulation.py). The global clip would rescale it by a factor
               that depends on the expert's flow gradient.
"""

from collections.abc import Callable, Sequence
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ki.model import lora
from ki.model import params as params_lib


def label_params(params, rules: Sequence[tuple[str, str]]):
  """Maps every leaf of `params` to its group name by the first fully-matching rule.

  Raises ValueError listing every leaf no rule covers, and every rule that matches nothing
  (a rule that matches nothing is almost always a typo).
  """
  compiled = [(re.compile(pattern), group) for pattern, group in rules]
  used = [False] * len(compiled)
  uncovered = []

  def label(path, _):
    name = params_lib.path_to_name(path)
    for i, (pattern, group) in enumerate(compiled):
      if pattern.fullmatch(name):
        used[i] = True
        return group
    uncovered.append(name)
    return None

  labels = jax.tree_util.tree_map_with_path(label, params)
  if uncovered:
    raise ValueError(
      f"{len(uncovered)} parameter(s) match no optimizer group rule: {uncovered}. "
      f"Add a (regex, group) pair covering them to config.optimizer.group_rules."
    )
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise ValueError(f"Optimizer group rule(s) {unused} match no parameter; remove or fix them.")
  return labels


def make_schedule(group: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from peak_lr / (warmup_steps + 1) to peak_lr, then cosine to end_lr."""
  return optax.warmup_cosine_decay_schedule(
    init_value=group.peak_lr / (group.warmup_steps + 1),
    peak_value=group.peak_lr,
    warmup_steps=group.warmup_steps,
    decay_steps=group.decay_steps,
    end_value=group.end_lr,
  )


# The clipping structures of `config.optimizer.clip` (see the module docstring).
CLIPS = ("global", "per_group")


def _group_chain(
  group: ml_collections.ConfigDict, clip_norm: float
) -> optax.GradientTransformation:
  """One group's AdamW, after clipping the group's own gradient to `clip_norm` (0: no clip)."""
  adamw = optax.adamw(
    make_schedule(group),
    b1=group.b1,
    b2=group.b2,
    eps=group.eps,
    weight_decay=group.weight_decay,
  )
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The parameter groups of a run and the optax transformation of its trainable part.

  labels: the group name of every parameter (a tree shaped like params).
  trainable: a tree of bools shaped like params: False for the leaves of frozen groups.
  tx: acts on the trainable part, `split(params)[0]`: its `update(grads, opt_state, trainable)`
    takes that part's gradients and values. Its `init` takes the whole params tree (or its
    ShapeDtypeStructs) and keeps state for the trainable leaves only.
  schedules: {group: schedule(step) -> learning rate} for logging (0 for a frozen group).
  """

  tx: optax.GradientTransformation
  labels: Any
  trainable: Any
  schedules: dict[str, Callable[[jax.Array], jax.Array]]

  def split(self, tree) -> tuple[dict, dict]:
    """(trainable part, frozen part) of a tree shaped like params (params, labels, EMA...): two
    nested dicts holding the leaves whose `trainable` flag is True resp. False."""
    trainable = params_lib.flatten(self.trainable)
    parts: tuple[dict, dict] = ({}, {})
    for name, leaf in params_lib.flatten(tree).items():
      parts[0 if trainable[name] else 1][name] = leaf
    return params_lib.unflatten(parts[0]), params_lib.unflatten(parts[1])

  @staticmethod
  def combine(trainable: dict, frozen: dict) -> dict:
    """Undoes `split`: the whole tree again."""
    return params_lib.unflatten({**params_lib.flatten(trainable), **params_lib.flatten(frozen)})


def make_optimizer(optimizer_config: ml_collections.ConfigDict, params_shape) -> Optimizer:
  """Builds the multi-group optimizer for a params tree (arrays or ShapeDtypeStructs).

  Raises ValueError when a group named by the rules has no settings, when every group is
  frozen (nothing would train), or for an unknown clipping structure.
  """
  if optimizer_config.clip not in CLIPS:
    raise ValueError(
      f"Unknown config.optimizer.clip {optimizer_config.clip!r}; choose from {list(CLIPS)}."
    )
  labels = label_params(params_shape, params_lib.group_rules(optimizer_config.group_rules))
  groups = dict(optimizer_config.groups)
  # Sorted: the traced program (hence the compile cache key, and the order of collectives on
  # every host) must not depend on Python's per-process string hashing.
  used = sorted(set(jax.tree.leaves(labels)))
  missing = sorted(set(used) - set(groups))
  if missing:
    raise ValueError(
      f"Optimizer group(s) {missing} are named by group_rules but have no settings in "
      f"config.optimizer.groups (has {sorted(groups)})."
    )
  frozen = {name for name in used if groups[name].get("frozen", False)}
  trainable_groups = [name for name in used if name not in frozen]
  if not trainable_groups:
    raise ValueError(f"Every optimizer group {used} is frozen: nothing would train.")
  trainable = jax.tree.map(lambda label: label not in frozen, labels)
  schedules = {
    name: (lambda step: jnp.zeros([], jnp.float32))
    if name in frozen
    else make_schedule(groups[name])
    for name in used
  }
  partition = Optimizer(optax.identity(), labels, trainable, schedules)
  trainable_labels, _ = partition.split(labels)
  per_group = optimizer_config.clip == "per_group"
  group_clip = optimizer_config.clip_norm if per_group else 0.0
  # multi_transform hands each group's chain only that group's leaves, so a per-group clip's norm
  # is the group's own.
  inner = optax.multi_transform(
    {name: _group_chain(groups[name], group_clip) for name in trainable_groups}, trainable_labels
  )
  if optimizer_config.clip_norm and not per_group:
    inner = optax.chain(optax.clip_by_global_norm(optimizer_config.clip_norm), inner)
  # State for the trainable part only, from the whole tree (ki.train.state initialises from it).
  tx = optax.GradientTransformation(
    init=lambda params: inner.init(partition.split(params)[0]), update=inner.update
  )
  return dataclasses.replace(partition, tx=tx)


def use_lora(config: ml_collections.ConfigDict, ranks=None) -> None:
  """Turns a training config into its LoRA fine-tune, in place (unlocked config): adapters of
  `ranks` (default openpi's, ki.model.lora.OPENPI_RANKS) on both streams, the "pi05_lora" group
  rules, each stream's adapters trained with that stream's settings, the language model's base
  frozen. experiments/droid_ki_lora.py and benchmarks/tpu_fit_bench.py both build LoRA this way.
  """
  config.model.update(dict(lora.OPENPI_RANKS) if ranks is None else ranks)
  config.optimizer.group_rules = "pi05_lora"
  groups = config.optimizer.groups
  groups.vlm_lora = dict(groups.vlm)
  groups.action_expert_lora = dict(groups.action_expert)
  groups.frozen = dict(groups.vlm, frozen=True)


def group_norms(tree, labels) -> dict[str, jax.Array]:
  """Global L2 norm of `tree`'s leaves per group: {group: scalar}."""
  squares: dict[str, jax.Array] = {}
  for leaf, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)):
    squares[label] = squares.get(label, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {label: jnp.sqrt(total) for label, total in squares.items()}
