"""Analytic model FLOPs of pi0.5-KI, for MFU.

Counts the matrix multiplications of one training example (multiply-add = 2 FLOPs), forward and
backward (backward = 2x forward), at the configured sequence lengths: every camera through SigLIP,
the full prefix (images + max_token_len text) through the VLM, the action horizon through the
expert, and logits only at max_loss_tokens positions. Rematerialisation is not counted: MFU is
model FLOPs, not hardware FLOPs. ki_method.md quotes ~11 TFLOP for full pi0.5-KI with 2 cameras,
260 text tokens and H = 50; `tests/model/test_flops.py` checks this count against that figure.
"""

from ki.model import gemma, siglip


def _siglip_forward(variant_name: str, image_size: int, out_width: int) -> float:
  v = siglip.get_variant(variant_name)
  tokens = (image_size // v.patch_size) ** 2
  patch = 2 * tokens * (v.patch_size**2 * 3) * v.width
  per_layer = 2 * tokens * (4 * v.width * v.width + 2 * v.width * v.mlp_dim)
  attention = 2 * 2 * tokens * tokens * v.width
  head = 2 * tokens * v.width * out_width
  return patch + v.depth * (per_layer + attention) + head


def _gemma_layer_matmuls(v: gemma.Variant, tokens: int) -> float:
  q_and_out = 2 * v.width * v.num_heads * v.head_dim
  kv = 2 * v.width * v.num_kv_heads * v.head_dim
  mlp = 3 * v.width * v.mlp_dim
  return 2 * tokens * (q_and_out + kv + mlp)


def forward_flops(config) -> float:
  """FLOPs of one example's training forward pass."""
  vlm = gemma.get_variant(config.vlm_variant)
  expert = gemma.get_variant(config.expert_variant)
  num_images = len(config.image_keys)
  images = num_images * _siglip_forward(config.siglip_variant, config.image_size, vlm.width)
  prefix = config.num_image_tokens + config.max_token_len
  horizon = config.action_horizon
  attention_width = vlm.num_heads * vlm.head_dim
  layers = vlm.depth * (
    _gemma_layer_matmuls(vlm, prefix)
    + _gemma_layer_matmuls(expert, horizon)
    + 2 * 2 * prefix * prefix * attention_width  # prefix scores and values
    + 2 * 2 * horizon * (prefix + horizon) * attention_width  # expert over prefix + itself
  )
  logits = 2 * config.max_loss_tokens * vlm.width * config.vocab_size
  action_io = 2 * horizon * 2 * config.action_dim * expert.width + 2 * 2 * expert.width**2
  return images + layers + logits + action_io


def training_flops_per_example(config) -> float:
  """Forward + backward model FLOPs for one training example."""
  return 3.0 * forward_flops(config)
