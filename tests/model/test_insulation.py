"""Knowledge insulation: the flow loss never reaches the VLM; the FAST loss never reaches the
expert."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki.model import params as params_lib
from ki.model import pi05
from tests.model.tiny import tiny_config, tiny_params

EXPERT_ROOTS = ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")
# The VLM's final norm only feeds the language-model head, so no flow gradient can reach it in
# either mode; every other VLM leaf must receive one when insulation is off.
FEEDS_ONLY_THE_LM_HEAD = ("PaliGemma/llm/final_norm/scale",)


def _is_expert(path: str) -> bool:
  """The action expert: its projections and the `_1` weights of the language model.

  (SigLIP's `LayerNorm_1` and `Dense_1` are flax auto-names, not expert weights.)
  """
  parts = path.split("/")
  if parts[0] in EXPERT_ROOTS:
    return True
  return parts[:2] == ["PaliGemma", "llm"] and any(p.endswith("_1") for p in parts[2:])


TERMS = ("flow_mse", "token_ce")


def _grad_norms(config, params):
  """{term: {leaf: max |gradient of the term's loss|}} for the flow and the token loss.

  Both gradients come from one program (jax.jacrev: one forward pass, the backward pass vmapped
  over the two terms), so each configuration compiles once rather than once per term. Each row of
  the Jacobian is that term's gradient alone: a stop-gradient still gives an exact zero.
  """
  obs = pi05.fake_observation(config, 2)
  actions = pi05.fake_actions(config, 2)

  def losses(p):
    terms = pi05.compute_losses(p, config, obs, actions, jax.random.key(3))
    return jnp.stack([jnp.sum(terms[term]) for term in TERMS])

  jacobian = jax.jit(jax.jacrev(losses))(params)
  return {
    term: {name: float(jnp.max(jnp.abs(g[i]))) for name, g in params_lib.named_leaves(jacobian)}
    for i, term in enumerate(TERMS)
  }


@pytest.fixture(scope="module", params=[True, False], ids=["ki_on", "ki_off"])
def setup(request):
  config = tiny_config(knowledge_insulation=request.param)
  params = tiny_params(config)
  return config, _grad_norms(config, params)


def test_flow_loss_gradient_into_the_vlm(setup):
  config, grad_norms = setup
  norms = grad_norms["flow_mse"]
  vlm = {p: n for p, n in norms.items() if not _is_expert(p)}
  expert = {p: n for p, n in norms.items() if _is_expert(p)}
  assert len(vlm) == 32 and len(expert) == 19
  assert all(n > 0 for n in expert.values()), expert
  if config.knowledge_insulation:
    assert {p: n for p, n in vlm.items() if n != 0.0} == {}
  else:
    reached = {p for p, n in vlm.items() if n > 0}
    assert reached == set(vlm) - set(FEEDS_ONLY_THE_LM_HEAD)


def test_fast_loss_never_reaches_the_expert(setup):
  _, grad_norms = setup
  norms = grad_norms["token_ce"]
  assert {p: n for p, n in norms.items() if _is_expert(p) and n != 0.0} == {}
  # ... and it does train the whole VLM, SigLIP included.
  assert all(n > 0 for p, n in norms.items() if not _is_expert(p))


def test_insulation_changes_gradients_not_values():
  """The switch is a stop-gradient only: both modes compute identical losses."""
  on, off = tiny_config(knowledge_insulation=True), tiny_config(knowledge_insulation=False)
  params = tiny_params(on)
  obs, actions = pi05.fake_observation(on, 2), pi05.fake_actions(on, 2)
  run = functools.partial(
    pi05.compute_losses, observation=obs, actions=actions, rng=jax.random.key(5)
  )
  losses_on, losses_off = run(params, on), run(params, off)
  for term in ("token_ce", "flow_mse"):
    np.testing.assert_array_equal(losses_on[term], losses_off[term])


@pytest.mark.slow
def test_lora_adapters_are_insulated_too():
  """With adapters on both streams (ki.model.gemma.LoRA), KI holds for them: the VLM's adapters
  learn from the token loss only, the expert's from the flow loss only."""
  config = tiny_config(vlm_lora_rank=2, expert_lora_rank=3, expert_lora_alpha=3.0)
  params = tiny_params(config)
  norms = _grad_norms(config, params)
  flow, token = norms["flow_mse"], norms["token_ce"]
  adapters = [name for name in flow if name.endswith(("lora_a", "lora_b"))]
  expert = [name for name in adapters if _is_expert(name)]
  vlm = [name for name in adapters if not _is_expert(name)]
  assert len(expert) == len(vlm) == 10
  assert {name: flow[name] for name in vlm if flow[name] != 0.0} == {}
  assert {name: token[name] for name in expert if token[name] != 0.0} == {}
  assert all(flow[name] > 0 for name in expert)
  assert all(token[name] > 0 for name in vlm)
