"""Our split attention computes what openpi's pi0.5 computes with one joint masked softmax.

openpi runs the prefix and the suffix as one sequence: keys = [prefix ; suffix], one mask from the
prefix-LM rule with suffix ar = [1, 0, ..., 0], positions = cumsum(valid) - 1 over the whole
sequence. This test re-implements that formulation in plain jax.numpy over our parameter tree
(openpi's layout) and checks the velocity against ours, so an openpi checkpoint gives the same
actions here. SigLIP and the embeddings are flax's own modules in both, so they are shared.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ki.model import gemma, masks, pi05


def _rms(x, scale=None, modulation=None):
  normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
  if modulation is None:
    return normed * (1 + scale), None
  scale, shift, gate = jnp.split(modulation[:, None, :], 3, axis=-1)
  return normed * (1 + scale) + shift, gate


def _joint_velocity(params, config, obs, x_t, time):
  model = pi05.Pi05(config)
  variables = {"params": params}
  prefix, prefix_mask, prefix_ar = model.apply(variables, obs, method=pi05.Pi05.embed_prefix)
  suffix, cond = model.apply(variables, x_t, time, method=pi05.Pi05.embed_suffix)
  horizon = x_t.shape[1]
  input_mask = jnp.concatenate([prefix_mask, jnp.ones(suffix.shape[:2], bool)], axis=1)
  ar = jnp.concatenate(
    [prefix_ar, jnp.broadcast_to(jnp.array([1] + [0] * (horizon - 1)), suffix.shape[:2])], axis=1
  )
  mask = masks.make_attn_mask(input_mask, ar)
  positions = jnp.cumsum(input_mask, axis=1) - 1
  split = prefix.shape[1]
  layers = params["PaliGemma"]["llm"]["layers"]
  variant = gemma.get_variant(config.vlm_variant)
  xs = [prefix.astype(jnp.float32), suffix]

  def dense(p, x):
    return x @ p["kernel"] + p["bias"]

  for layer in range(variant.depth):
    p = jax.tree.map(lambda w, layer=layer: w[layer], layers)
    normed = [
      _rms(xs[0], p["pre_attention_norm"]["scale"]),
      _rms(xs[1], modulation=dense(p["pre_attention_norm_1"]["Dense_0"], cond)),
    ]
    attn = p["attn"]
    q = jnp.concatenate(
      [
        jnp.einsum("BTD,NDH->BTNH", normed[0][0], attn["q_einsum"]["w"]),
        jnp.einsum("BTD,NDH->BTNH", normed[1][0], attn["q_einsum_1"]["w"]),
      ],
      axis=1,
    )
    k, v = (
      jnp.concatenate(z, axis=1)
      for z in zip(
        jnp.einsum("BSD,2KDH->2BSKH", normed[0][0], attn["kv_einsum"]["w"]),
        jnp.einsum("BSD,2KDH->2BSKH", normed[1][0], attn["kv_einsum_1"]["w"]),
      )
    )
    q = gemma.apply_rope(q, positions) * variant.head_dim**-0.5
    k = gemma.apply_rope(k, positions)
    logits = jnp.einsum("BTNH,BSKH->BNTS", q, k)
    logits = jnp.where(mask[:, None], logits, -2.3819763e38)
    encoded = jnp.einsum("BNTS,BSKH->BTNH", jax.nn.softmax(logits, axis=-1), v)
    outs = [
      jnp.einsum("BTNH,NHD->BTD", encoded[:, :split], attn["attn_vec_einsum"]["w"]),
      jnp.einsum("BTNH,NHD->BTD", encoded[:, split:], attn["attn_vec_einsum_1"]["w"]),
    ]
    xs = [xs[0] + outs[0], xs[1] + outs[1] * normed[1][1]]
    y0, _ = _rms(xs[0], p["pre_ffw_norm"]["scale"])
    y1, gate = _rms(xs[1], modulation=dense(p["pre_ffw_norm_1"]["Dense_0"], cond))
    mlps = []
    for y, m in ((y0, p["mlp"]), (y1, p["mlp_1"])):
      mlps.append(
        (jax.nn.gelu(y @ m["gating_einsum"][0]) * (y @ m["gating_einsum"][1])) @ m["linear"]
      )
    xs = [xs[0] + mlps[0], xs[1] + mlps[1] * gate]
  llm = params["PaliGemma"]["llm"]
  out, _ = _rms(xs[1], modulation=dense(llm["final_norm_1"]["Dense_0"], cond))
  return dense(params["action_out_proj"], out)


def test_velocity_equals_openpi_joint_attention(config, params):
  obs = pi05.fake_observation(config, 2, with_fast=False)
  # A masked camera in one example: openpi masks the unused third DROID camera this way.
  obs = obs.replace(image_masks={**obs.image_masks, "left_wrist_0_rgb": jnp.array([True, False])})
  x_t = jax.random.normal(jax.random.key(4), (2, config.action_horizon, config.action_dim))
  time = jnp.array([0.25, 0.9])
  reference = _joint_velocity(params, config, obs, x_t, time)
  model = pi05.Pi05(config)
  _, kv, prefix_mask, prefix_ar = model.apply({"params": params}, obs, method=pi05.Pi05.fill_cache)
  visible = masks.visible_to_expert(prefix_mask, prefix_ar)
  ours = model.apply({"params": params}, kv, visible, x_t, time, method=pi05.Pi05.velocity)
  np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-5)


def test_fused_attention_kernel_computes_the_same(config, params):
  """attention_impl="dot_product_attention" (cuDNN flash attention where it fits on GPU) is the
  same function as openpi's einsum arithmetic; on CPU JAX runs its XLA version."""
  fused = dataclasses.replace(config, attention_impl="dot_product_attention")
  obs, actions = pi05.fake_observation(config, 2), pi05.fake_actions(config, 2)
  noise = jax.random.normal(jax.random.key(4), actions.shape)
  run = functools.partial(
    pi05.compute_losses,
    params,
    observation=obs,
    actions=actions,
    rng=None,
    noise=noise,
    time=jnp.array([0.3, 0.7]),
  )
  reference, ours = run(config=config), run(config=fused)
  for term in ("token_ce", "flow_mse"):
    np.testing.assert_allclose(ours[term], reference[term], rtol=1e-4)
  sample = functools.partial(pi05.sample_actions, params, observation=obs, rng=None, noise=noise)
  np.testing.assert_allclose(sample(config=fused), sample(config=config), rtol=1e-4, atol=1e-5)
