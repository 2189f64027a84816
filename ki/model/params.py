"""Parameter names and the pi0.5 parameter groups: the one place that knows how leaves are named.

A parameter's name is its tree path joined by "/" (e.g. "PaliGemma/llm/layers/q_einsum_1/w").
The optimizer groups, the weight loaders (which leaves a PaliGemma checkpoint lacks) and the
tests all match these names.
"""

from collections.abc import Mapping, Sequence
import re
from typing import Any

import jax

# The action expert: its projections, the time MLP, and every PaliGemma/llm component with a "_1"
# suffix (the second stream's weights). SigLIP has flax auto-names ending in "_1" too (Dense_1,
# LayerNorm_1) that are VLM, hence the "llm/" anchor.
EXPERT_REGEX = (
  r"(action_in_proj|action_out_proj|time_mlp_in|time_mlp_out)/.*"
  r"|PaliGemma/llm/(.*/)?[^/]*_1(/.*)?"
)
EXPERT_PATTERN = re.compile(EXPERT_REGEX)

# LoRA adapters (ki.model.gemma.LoRA): `<einsum>/lora_a|b` in attention, `<weight>_lora_a|b` in the
# MLPs; the expert's sit under a "_1" component like the rest of its weights.
LORA_REGEX = r"PaliGemma/llm/.*lora_[ab]"
EXPERT_LORA_REGEX = r"PaliGemma/llm/(.*/)?[^/]*_1/([^/]*_)?lora_[ab]"

# Ordered (regex, group) rules by name; `config.optimizer.group_rules` names one of these (or
# spells its own list of pairs). First full match wins.
GROUP_RULES: Mapping[str, tuple[tuple[str, str], ...]] = {
  "pi05": ((EXPERT_REGEX, "action_expert"), (r"PaliGemma/.*", "vlm")),
  # LoRA fine-tuning as openpi freezes it: the language model's base weights (both streams) in
  # "frozen" (give it frozen=True), the adapters in their own groups; SigLIP, the action
  # projections and the time MLP still train (openpi's freeze filter leaves them out too).
  "pi05_lora": (
    (EXPERT_LORA_REGEX, "action_expert_lora"),
    (LORA_REGEX, "vlm_lora"),
    (r"PaliGemma/llm/.*", "frozen"),
    (EXPERT_REGEX, "action_expert"),
    (r"PaliGemma/.*", "vlm"),
  ),
}


def group_rules(rules: str | Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
  """The (regex, group) pairs a config names: a key of GROUP_RULES, or the pairs themselves."""
  if isinstance(rules, str):
    if rules not in GROUP_RULES:
      raise ValueError(f"Unknown group rules {rules!r}; choose from {sorted(GROUP_RULES)}.")
    return GROUP_RULES[rules]
  return tuple((str(pattern), str(group)) for pattern, group in rules)


def path_to_name(path) -> str:
  """Joins a jax tree path into the "/"-separated parameter name."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


def named_leaves(tree) -> list[tuple[str, Any]]:
  """[(name, leaf)] in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_to_name(path), leaf) for path, leaf in leaves]


def flatten(tree) -> dict[str, Any]:
  """{name: leaf}."""
  return dict(named_leaves(tree))


def unflatten(flat: dict[str, Any]) -> dict:
  """{name: leaf} -> the nested dict `flatten` came from (parameter trees are plain dicts)."""
  tree: dict = {}
  for name, leaf in flat.items():
    node = tree
    *parents, last = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def map_with_names(fn, tree):
  """tree_map whose function receives (name, leaf)."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_to_name(path), leaf), tree)
