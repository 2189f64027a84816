"""The two-group optimizer: regex labelling, coverage errors, per-group schedules and freezing."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ki.model import params as params_lib
from ki.model import pi05
from ki.train import optimizer


def _params():
  """A hand-made tree with the names of every kind of pi0.5 parameter."""

  def z(*shape):
    return jnp.ones(shape, jnp.float32)

  return {
    "PaliGemma": {
      "img": {
        "embedding": {"kernel": z(2, 2, 3, 4)},
        "Transformer": {"encoderblock": {"MlpBlock_0": {"Dense_1": {"kernel": z(2, 4, 4)}}}},
      },
      "llm": {
        "embedder": {"input_embedding": z(16, 4)},
        "final_norm": {"scale": z(4)},
        "final_norm_1": {"Dense_0": {"kernel": z(4, 12)}},
        "layers": {
          "attn": {"q_einsum": {"w": z(2, 1, 4, 4)}, "q_einsum_1": {"w": z(2, 1, 4, 4)}},
          "mlp": {"linear": z(2, 8, 4)},
          "mlp_1": {"linear": z(2, 8, 4)},
        },
      },
    },
    "action_in_proj": {"kernel": z(8, 4), "bias": z(4)},
    "action_out_proj": {"kernel": z(4, 8), "bias": z(8)},
    "time_mlp_in": {"kernel": z(4, 4)},
    "time_mlp_out": {"kernel": z(4, 4)},
  }


def _group(**overrides):
  settings = dict(
    peak_lr=1e-2,
    warmup_steps=2,
    decay_steps=10,
    end_lr=1e-3,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.0,
    frozen=False,
  )
  settings.update(overrides)
  return settings


def _config(vlm=None, expert=None, rules="pi05", clip_norm=1.0, clip="global"):
  return ml_collections.ConfigDict(
    dict(
      group_rules=rules,
      groups=dict(vlm=vlm or _group(), action_expert=expert or _group()),
      clip_norm=clip_norm,
      clip=clip,
    )
  )


def test_pi05_rules_split_expert_from_vlm():
  labels = optimizer.label_params(_params(), params_lib.GROUP_RULES["pi05"])
  labels = dict(params_lib.named_leaves(labels))
  assert labels["PaliGemma/llm/layers/attn/q_einsum_1/w"] == "action_expert"
  assert labels["PaliGemma/llm/final_norm_1/Dense_0/kernel"] == "action_expert"
  assert labels["PaliGemma/llm/layers/mlp_1/linear"] == "action_expert"
  assert labels["action_in_proj/bias"] == "action_expert"
  assert labels["time_mlp_out/kernel"] == "action_expert"
  assert labels["PaliGemma/llm/layers/attn/q_einsum/w"] == "vlm"
  assert labels["PaliGemma/llm/embedder/input_embedding"] == "vlm"
  assert labels["PaliGemma/llm/final_norm/scale"] == "vlm"
  # SigLIP's Dense_1 ends in "_1" but is part of the VLM.
  assert labels["PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel"] == "vlm"


def test_pi05_rules_cover_the_openpi_checkpoint_layout():
  # The full-size tree by shape alone; tests/model/test_param_layout.py checks it equals openpi's.
  tree = jax.eval_shape(functools.partial(pi05.init_params, pi05.Config()), jax.random.key(0))
  labels = dict(
    params_lib.named_leaves(optimizer.label_params(tree, params_lib.GROUP_RULES["pi05"]))
  )
  expert = sorted(n for n, g in labels.items() if g == "action_expert")
  assert len(labels) == 51 and len(expert) == 19
  assert all(
    "_1/" in n
    or n.split("/")[0] in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")
    for n in expert
  )
  assert all(n.startswith("PaliGemma/") for n, g in labels.items() if g == "vlm")


def test_uncovered_parameter_is_named_in_the_error():
  params = _params()
  params["new_head"] = {"kernel": jnp.ones((2,))}
  with pytest.raises(ValueError, match="new_head/kernel"):
    optimizer.label_params(params, params_lib.GROUP_RULES["pi05"])


def test_rule_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="nothing_here"):
    optimizer.label_params(_params(), [("nothing_here", "vlm"), (".*", "vlm")])


def test_first_matching_rule_wins():
  tree = {"a": {"b": 1.0}, "c": 1.0}
  labels = optimizer.label_params(tree, [("a/.*", "first"), (".*", "second")])
  assert labels == {"a": {"b": "first"}, "c": "second"}


def test_frozen_group_is_left_out_of_the_trainable_part():
  params = _params()
  opt = optimizer.make_optimizer(_config(vlm=_group(frozen=True)), params)
  trainable, frozen = opt.split(params)
  names = dict(params_lib.named_leaves(opt.labels))
  assert set(params_lib.flatten(frozen)) == {n for n, g in names.items() if g == "vlm"}
  assert set(params_lib.flatten(trainable)) == {n for n, g in names.items() if g != "vlm"}
  assert jax.tree.structure(opt.combine(trainable, frozen)) == jax.tree.structure(params)
  # The optimizer's state and updates cover the trainable part only; it moves.
  state = opt.tx.init(params)  # from the whole tree, as ki.train.state does
  # Adam's two moments for the trainable leaves, none for the frozen ones.
  moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(trainable))
  updates, _ = opt.tx.update(jax.tree.map(jnp.ones_like, trainable), state, trainable)
  assert set(params_lib.flatten(updates)) == set(params_lib.flatten(trainable))
  for name, update in params_lib.named_leaves(updates):
    assert np.all(np.asarray(update) < 0), name
  assert float(opt.schedules["vlm"](5)) == 0.0


def test_every_group_frozen_is_an_error():
  config = _config(vlm=_group(frozen=True), expert=_group(frozen=True))
  with pytest.raises(ValueError, match="nothing would train"):
    optimizer.make_optimizer(config, _params())


def test_each_group_follows_its_own_schedule():
  params = {"PaliGemma": {"w": jnp.zeros(3)}, "action_in_proj": {"kernel": jnp.zeros(3)}}
  rules = (("action_in_proj/.*", "action_expert"), ("PaliGemma/.*", "vlm"))
  config = _config(
    vlm=_group(peak_lr=1e-1),
    expert=_group(peak_lr=1e-3),
    rules=rules,
    clip_norm=0.0,
  )
  opt = optimizer.make_optimizer(config, params)
  tx, schedules = opt.tx, opt.schedules
  # After warmup the schedule is at peak; Adam's first step moves each weight by ~lr.
  np.testing.assert_allclose(schedules["vlm"](2), 1e-1, rtol=1e-6)
  np.testing.assert_allclose(schedules["action_expert"](2), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedules["vlm"](10), 1e-3, rtol=1e-6)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  np.testing.assert_allclose(updates["PaliGemma"]["w"], -1e-1 / 3, rtol=1e-4)
  np.testing.assert_allclose(updates["action_in_proj"]["kernel"], -1e-3 / 3, rtol=1e-4)


def test_clipping_is_by_the_global_norm_of_all_groups():
  # openpi clips the whole gradient by one global norm: a spike in the expert's gradient scales
  # the VLM's gradient down too (per-group clipping would leave the small VLM gradient alone).
  params = {"PaliGemma": {"w": jnp.zeros(4)}, "action_in_proj": {"kernel": jnp.zeros(4)}}
  rules = (("action_in_proj/.*", "action_expert"), ("PaliGemma/.*", "vlm"))
  tx = optimizer.make_optimizer(_config(rules=rules, clip_norm=1.0), params).tx
  grads = {"PaliGemma": {"w": jnp.full(4, 0.05)}, "action_in_proj": {"kernel": jnp.full(4, 50.0)}}
  global_norm = float(optax.global_norm(grads))
  _, state = tx.update(grads, tx.init(params), params)
  # Adam's first moment after one step is (1 - b1) * the gradient it was given.
  adam = state[1].inner_states["vlm"].inner_state[0]
  np.testing.assert_allclose(adam.mu["PaliGemma"]["w"], 0.1 * 0.05 / global_norm, rtol=1e-5)


def test_per_group_clipping_scales_each_group_by_its_own_norm():
  # The same gradients as above: the expert's spike is clipped by its own norm, the small VLM
  # gradient (under the threshold) reaches Adam unchanged, whatever the expert's gradient is.
  params = {"PaliGemma": {"w": jnp.zeros(4)}, "action_in_proj": {"kernel": jnp.zeros(4)}}
  rules = (("action_in_proj/.*", "action_expert"), ("PaliGemma/.*", "vlm"))
  tx = optimizer.make_optimizer(_config(rules=rules, clip="per_group"), params).tx
  grads = {"PaliGemma": {"w": jnp.full(4, 0.05)}, "action_in_proj": {"kernel": jnp.full(4, 50.0)}}
  _, state = tx.update(grads, tx.init(params), params)
  # Each group's chain is (clip, AdamW); Adam's first moment is (1 - b1) * what it was given.
  vlm = state.inner_states["vlm"].inner_state[1][0]
  expert = state.inner_states["action_expert"].inner_state[1][0]
  np.testing.assert_array_equal(vlm.mu["PaliGemma"]["w"], 0.1 * grads["PaliGemma"]["w"])
  np.testing.assert_allclose(expert.mu["action_in_proj"]["kernel"], 0.1 * 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"'per_layer'; choose from \['global', 'per_group'\]"):
    optimizer.make_optimizer(_config(rules=rules, clip="per_layer"), params)


def test_group_rules_by_name_or_as_pairs():
  by_name = optimizer.label_params(_params(), params_lib.group_rules("pi05"))
  as_pairs = optimizer.label_params(
    _params(), params_lib.group_rules([list(r) for r in params_lib.GROUP_RULES["pi05"]])
  )
  assert by_name == as_pairs
  with pytest.raises(ValueError, match="Unknown group rules 'pi06'"):
    params_lib.group_rules("pi06")


def test_group_without_settings_is_an_error():
  config = _config()
  del config.groups["action_expert"]
  with pytest.raises(ValueError, match="action_expert"):
    optimizer.make_optimizer(config, _params())


def test_group_norms_split_by_label():
  params = {"PaliGemma": {"w": jnp.full(4, 3.0)}, "action_in_proj": {"kernel": jnp.full(1, 2.0)}}
  rules = params_lib.GROUP_RULES["pi05"][:1] + (("PaliGemma/.*", "vlm"),)
  labels = optimizer.label_params(params, rules)
  norms = optimizer.group_norms(params, labels)
  np.testing.assert_allclose(norms["vlm"], 6.0)
  np.testing.assert_allclose(norms["action_expert"], 2.0)
