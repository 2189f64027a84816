"""The optimizer: one optax chain per parameter group, groups named by ordered regex rules.

A parameter's name is its tree path joined by "/" (e.g. "PaliGemma/llm/layers/q_einsum_1/w").
`config.optimizer.group_rules` is an ordered list of (regex, group) pairs; the first regex that
fully matches a name gives its group, and a name no rule matches is an error (big_vision's optax.py
does the same, so that a renamed parameter cannot silently fall out of training).

Each group in `config.optimizer.groups` has its own AdamW with a warmup + cosine schedule, or
`frozen=True`, which zeroes its updates and keeps no state. Before the groups, the gradient of all
parameters together is clipped to `config.optimizer.clip_norm` (global norm, as openpi does): one
scale for the whole model, so a gradient spike in one group also damps the other's step, and a
run's clipping means the same thing as openpi's.
"""

from collections.abc import Callable, Sequence
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

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


def _group_chain(group: ml_collections.ConfigDict) -> optax.GradientTransformation:
  if group.get("frozen", False):
    return optax.set_to_zero()
  return optax.adamw(
    make_schedule(group),
    b1=group.b1,
    b2=group.b2,
    eps=group.eps,
    weight_decay=group.weight_decay,
  )


def make_optimizer(optimizer_config: ml_collections.ConfigDict, params_shape):
  """Builds the multi-group optimizer for a params tree (arrays or ShapeDtypeStructs).

  Returns (tx, labels, schedules): the optax transformation, the tree of group names (same
  structure as params) and {group: schedule(step) -> learning rate} for logging (0 if frozen).
  """
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
  transforms = {name: _group_chain(groups[name]) for name in used}
  schedules = {
    name: (lambda step: jnp.zeros([], jnp.float32))
    if groups[name].get("frozen", False)
    else make_schedule(groups[name])
    for name in used
  }
  tx = optax.multi_transform(transforms, labels)
  if optimizer_config.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optimizer_config.clip_norm), tx)
  return tx, labels, schedules


def group_norms(tree, labels) -> dict[str, jax.Array]:
  """Global L2 norm of `tree`'s leaves per group: {group: scalar}."""
  squares: dict[str, jax.Array] = {}
  for leaf, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)):
    squares[label] = squares.get(label, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {label: jnp.sqrt(total) for label, total in squares.items()}
