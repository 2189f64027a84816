"""Attention masks and RoPE positions for pi0.5 with Knowledge Insulation.

Token layout of one training example (a single forward pass):

  prefix  = [image tokens | prompt "Task: ..., State: ...;\\nAction: " | FAST postfix | padding]
            ar:    0 ...0   0 ...................................... 0   1 ........ 1
  suffix  = [noisy action tokens (H)]   (the action expert's stream)

  query \\ key      | images + prompt | FAST postfix        | expert tokens
  images + prompt  | bidirectional   | no                  | no
  FAST postfix     | yes             | causal              | no
  expert tokens    | yes (stop-grad) | no                  | bidirectional

At inference there is no postfix; the expert sees exactly the same keys at exactly the same
positions, because its positions continue from the count of valid tokens *before* the postfix.
"""

import jax.numpy as jnp


def make_attn_mask(input_mask, ar_mask):
  """big_vision's prefix-LM rule: a token attends to valid tokens whose cumulative ar is <= its own.

  Args:
    input_mask: bool [B, N], True for real tokens, False for padding.
    ar_mask: int or bool [B, N] (or [N]); 1 where a token starts a new causal block.

  Returns:
    bool [B, N, N] (query, key).
  """
  ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
  cumsum = jnp.cumsum(ar_mask, axis=1)
  attend = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] & input_mask[:, :, None]
  return attend & valid


def prefix_positions(input_mask):
  """RoPE positions of the prefix: valid tokens count up from 0, padding repeats. [B, N] int32."""
  return (jnp.cumsum(input_mask, axis=1) - 1).astype(jnp.int32)


def visible_to_expert(input_mask, ar_mask):
  """Prefix tokens the action expert may read: valid and before the first causal (postfix) token.

  Args:
    input_mask: bool [B, N]; ar_mask: int [B, N].
  Returns:
    bool [B, N].
  """
  return input_mask & (jnp.cumsum(ar_mask, axis=1) == 0)


def expert_positions(prefix_visible, horizon):
  """Expert positions continue from the count of prefix tokens it can see. [B, H] int32."""
  start = jnp.sum(prefix_visible, axis=1, dtype=jnp.int32)
  return start[:, None] + jnp.arange(horizon, dtype=jnp.int32)[None, :]


def expert_mask(prefix_visible, horizon):
  """Expert queries over [prefix keys ; expert keys]: [B, H, N + H] bool.

  The expert tokens form one bidirectional block (openpi's suffix ar mask [1, 0, ..., 0]).
  """
  batch = prefix_visible.shape[0]
  to_prefix = jnp.broadcast_to(
    prefix_visible[:, None, :], (batch, horizon, prefix_visible.shape[1])
  )
  to_expert = jnp.ones((batch, horizon, horizon), dtype=bool)
  return jnp.concatenate([to_prefix, to_expert], axis=-1)
