"""LoRA: the adapters' tree (openpi's names and shapes), the group rules that freeze the base, and
merging into the plain layout. Training with adapters (no gradient for the frozen base, which stays
exactly unchanged; merged checkpoints; resume) is in tests/train/test_lora_train.py."""

import jax
import numpy as np
import pytest

from ki.model import gemma, lora, pi05
from ki.model import params as params_lib
from ki.train import optimizer
from tests.model.tiny import tiny_config, tiny_params

RANKS = dict(vlm_lora_rank=2, vlm_lora_alpha=4.0, expert_lora_rank=3, expert_lora_alpha=3.0)


def _shapes(config):
  return params_lib.flatten(jax.eval_shape(lambda: pi05.init_params(config, jax.random.key(0))))


def test_lora_equations_are_openpis():
  assert gemma.lora_equations("BTD,NDH->BTNH") == ("BTD,NDL->BTNL", "BTNL,NLH->BTNH")
  assert gemma.lora_equations("BTNH,NHD->BTD") == ("BTNH,NHL->BTL", "BTL,NLD->BTD")
  with pytest.raises(ValueError, match="already"):
    gemma.lora_equations("BLD,DH->BLH")


def test_adapter_tree():
  base, adapted = _shapes(tiny_config()), _shapes(tiny_config(**RANKS))
  extra = {name: s.shape for name, s in adapted.items() if name not in base}
  assert set(base) <= set(adapted)
  assert all(adapted[n].shape == base[n].shape for n in base)
  v = gemma.get_variant("tiny")
  layers = "PaliGemma/llm/layers"
  depth, n, d, h, f = v.depth, v.num_heads, v.width, v.head_dim, v.mlp_dim
  for suffix, r in (("", 2), ("_1", 3)):
    assert extra[f"{layers}/attn/q_einsum{suffix}/lora_a"] == (depth, n, d, r)
    assert extra[f"{layers}/attn/q_einsum{suffix}/lora_b"] == (depth, n, r, h)
    assert extra[f"{layers}/attn/kv_einsum{suffix}/lora_a"] == (depth, 2, 1, d, r)
    assert extra[f"{layers}/attn/attn_vec_einsum{suffix}/lora_b"] == (depth, n, r, d)
    assert extra[f"{layers}/mlp{suffix}/gating_einsum_lora_a"] == (depth, 2, d, r)
    assert extra[f"{layers}/mlp{suffix}/gating_einsum_lora_b"] == (depth, 2, r, f)
    assert extra[f"{layers}/mlp{suffix}/linear_lora_a"] == (depth, f, r)
    assert extra[f"{layers}/mlp{suffix}/linear_lora_b"] == (depth, r, d)
  assert len(extra) == 2 * 10
  assert lora.count(adapted)["adapters"] == sum(int(np.prod(s)) for s in extra.values())


def test_group_rules_freeze_the_language_model_base():
  shapes = jax.eval_shape(lambda: pi05.init_params(tiny_config(**RANKS), jax.random.key(0)))
  labels = params_lib.flatten(optimizer.label_params(shapes, params_lib.group_rules("pi05_lora")))
  for name, group in labels.items():
    if name.endswith(("lora_a", "lora_b")):
      expected = "action_expert_lora" if params_lib.EXPERT_PATTERN.fullmatch(name) else "vlm_lora"
    elif name.startswith("PaliGemma/llm/"):
      expected = "frozen"
    elif name.startswith("PaliGemma/img/"):
      expected = "vlm"
    else:
      expected = "action_expert"
    assert group == expected, name


@pytest.mark.slow
def test_merged_params_give_the_same_outputs():
  config = tiny_config(**RANKS)
  params = tiny_params(config)  # perturbed(init_params), the init compiled (eager: minutes)
  merged = lora.merge(params, config)
  plain = lora.without_lora(config)
  assert jax.tree.structure(merged) == jax.tree.structure(
    jax.eval_shape(lambda: pi05.init_params(plain, jax.random.key(0)))
  )
  obs, actions = pi05.fake_observation(config, 2), pi05.fake_actions(config, 2)
  losses = jax.jit(pi05.compute_losses, static_argnums=1)
  with_adapters = losses(params, config, obs, actions, jax.random.key(2))
  folded = losses(merged, plain, obs, actions, jax.random.key(2))
  for term in ("token_ce", "flow_mse"):
    np.testing.assert_allclose(with_adapters[term], folded[term], rtol=2e-5, atol=1e-6)
  # The adapters matter: without them the outputs differ.
  base = {n: x for n, x in params_lib.flatten(params).items() if "lora" not in n}
  unadapted = losses(params_lib.unflatten(base), plain, obs, actions, jax.random.key(2))
  assert not np.allclose(with_adapters["flow_mse"], unadapted["flow_mse"], rtol=1e-4)
