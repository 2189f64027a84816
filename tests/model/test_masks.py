"""Who sees whom: the mask functions, and the same rules observed through the network."""

import jax
import jax.numpy as jnp
import numpy as np

from ki.model import masks, pi05


def test_prefix_lm_rule():
  input_mask = jnp.array([[1, 1, 1, 1, 1, 0]], bool)
  ar = jnp.array([[0, 0, 0, 1, 1, 0]])
  got = masks.make_attn_mask(input_mask, ar)[0]
  expected = np.array(
    [
      [1, 1, 1, 0, 0, 0],  # prefix: bidirectional, blind to the postfix
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],  # postfix: causal
      [1, 1, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 0],  # padding sees nothing and is seen by nothing
    ],
    bool,
  )
  np.testing.assert_array_equal(got, expected)


def test_expert_sees_valid_non_postfix_tokens_and_starts_after_them():
  input_mask = jnp.array([[1, 0, 1, 1, 1, 0]], bool)  # a masked camera token at index 1
  ar = jnp.array([[0, 0, 0, 1, 1, 0]])
  visible = masks.visible_to_expert(input_mask, ar)
  np.testing.assert_array_equal(visible[0], [1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(masks.expert_positions(visible, 3)[0], [2, 3, 4])
  mask = masks.expert_mask(visible, 3)[0]
  np.testing.assert_array_equal(mask[:, :6], np.tile([1, 0, 1, 0, 0, 0], (3, 1)).astype(bool))
  assert mask[:, 6:].all()  # expert tokens: one bidirectional block


def test_positions_skip_padding_and_masked_images():
  input_mask = jnp.array([[1, 0, 1, 1, 0]], bool)
  np.testing.assert_array_equal(masks.prefix_positions(input_mask)[0], [0, 0, 1, 2, 2])


def _with_postfix_tokens(obs, new_ids):
  tokens = jnp.where(obs.token_ar_mask == 1, new_ids, obs.tokenized_prompt)
  return obs.replace(tokenized_prompt=tokens.astype(jnp.int32))


def _prefix_hidden(params, config, obs):
  hidden, _, _, _ = pi05.Pi05(config).apply({"params": params}, obs, method=pi05.Pi05.fill_cache)
  return hidden[:, config.num_image_tokens :]


def test_prefix_is_blind_to_the_postfix_and_the_postfix_is_causal(config, params):
  obs = pi05.fake_observation(config, 1)
  postfix = np.flatnonzero(np.asarray(obs.token_ar_mask[0]))
  first, changed = postfix[0], postfix[2]
  edited = obs.replace(tokenized_prompt=obs.tokenized_prompt.at[:, changed].set(7))
  before, after = _prefix_hidden(params, config, obs), _prefix_hidden(params, config, edited)
  differs = np.abs(np.asarray(before - after)).max(axis=-1)[0] > 1e-6
  # Everything before the edited postfix token is untouched: the prompt and earlier FAST tokens.
  assert not differs[:changed].any()
  assert differs[changed] and first < changed


def test_expert_is_blind_to_the_postfix_and_the_prefix_to_the_expert(config, params):
  obs = pi05.fake_observation(config, 2)
  actions = pi05.fake_actions(config, 2)
  noise = jax.random.normal(jax.random.key(0), actions.shape)
  time = jnp.array([0.3, 0.8])

  def losses(observation, noise):
    return pi05.compute_losses(
      params, config, observation, actions, jax.random.key(1), noise=noise, time=time
    )

  reference = losses(obs, noise)
  other_postfix = losses(_with_postfix_tokens(obs, 11), noise)
  np.testing.assert_allclose(other_postfix["flow_mse"], reference["flow_mse"], rtol=1e-6)
  assert not np.allclose(other_postfix["token_ce"], reference["token_ce"])
  other_noise = losses(obs, noise + 1.0)
  np.testing.assert_array_equal(other_noise["token_ce"], reference["token_ce"])
  assert not np.allclose(other_noise["flow_mse"], reference["flow_mse"])


def test_text_logits_are_the_token_loss_without_the_expert(config, params):
  """pi05.text_logits (the VLM alone, what the KI ablation's VQA probes read) gives exactly the
  training pass's token loss: the VLM never reads the expert."""
  obs = pi05.fake_observation(config, 2)
  logits, targets, valid = pi05.text_logits(params, config, obs)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  token_ce = jnp.sum(nll * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
  losses = pi05.compute_losses(params, config, obs, pi05.fake_actions(config, 2), jax.random.key(0))
  np.testing.assert_allclose(token_ce, losses["token_ce"], rtol=1e-5)
  assert valid.any()
