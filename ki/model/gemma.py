"""Multi-expert Gemma: the VLM (stream 0) and the action expert (stream 1) share one attention
per layer.

Each stream has its own weights — norms, q/kv/out projections, GeGLU MLP — and its own tokens; the
streams meet only inside attention. Parameter names follow openpi's pi0.5 checkpoint: the VLM's are
PaliGemma's own (`attn/q_einsum`, `mlp`, `pre_attention_norm`, ...), the expert's carry the `_1`
suffix (`attn/q_einsum_1`, `mlp_1`, `pre_attention_norm_1/Dense_0`, ...). Layers are scanned, so
every layer parameter has a leading [depth] axis.

Who attends to what (pi0.5 with Knowledge Insulation, see ki_method.md):
  VLM queries     -> [context ; VLM keys]                         (the VLM never reads the expert)
  expert queries  -> [context ; insulate(VLM keys) ; expert keys]
where `context` is a key/value cache from an earlier pass (the prefix at inference, or the tokens
decoded so far), and `insulate` is jax.lax.stop_gradient when knowledge insulation is on: the flow
loss then cannot reach any VLM weight. Because the VLM queries never see expert keys, they are not
computed against them at all; masked entries would contribute exactly zero, so this equals one
joint masked softmax over all keys (openpi's formulation) up to summation order.

Einsum letters:
  B batch, T query length, S key/value length, N query heads, K key/value heads,
  G query heads per key/value head (N = K * G), H head dim, D model width, F MLP width, L layers.
"""

from collections.abc import Sequence
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# See gemma/modules.py: finite, so fully masked rows give a uniform softmax rather than NaN.
_BIG_NEG = -2.3819763e38
_VLM, _EXPERT = 0, 1


@dataclasses.dataclass(frozen=True)
class Variant:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int


VARIANTS = {
  "gemma_2b": Variant(
    width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
  ),
  "gemma_300m": Variant(
    width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256
  ),
  # pi0.5's proportions at a quarter of the width and 8 of 18 layers (the "medium" experiments):
  # the expert half as wide as the VLM with half its MLP ratio, the same depth and heads.
  "small": Variant(width=512, depth=8, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=64),
  "small_expert": Variant(
    width=256, depth=8, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64
  ),
  # The CPU KI ablation's VLM: twice the width of its "dummy" expert, the same depth and heads.
  "mini": Variant(width=128, depth=4, mlp_dim=256, num_heads=8, num_kv_heads=1, head_dim=16),
  "dummy": Variant(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
  # Smaller still, for tests that compile many times: same head layout as "dummy".
  "tiny": Variant(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16),
}


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters on one stream's attention and MLP weights (openpi's LoRAConfig).

  Each adapted weight W gets lora_a, lora_b (initialised N(0, 0.01) as openpi does), and the layer
  computes x W + (x lora_a) lora_b, scaled by alpha / rank in attention (openpi scales only there).
  openpi's gemma_2b_lora: rank 16, alpha 16; gemma_300m_lora: rank 32, alpha 32.
  """

  rank: int
  alpha: float

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


LORA_INIT = nn.initializers.normal(stddev=0.01)


def lora_equations(equation: str) -> tuple[str, str]:
  """The two einsums of an adapter on an Einsum weight, whose last two axes are (in, out).

  "BTD,NDH->BTNH" -> ("BTD,NDL->BTNL", "BTNL,NLH->BTNH"): lora_a replaces the output axis by the
  rank L, lora_b the input axis (openpi's construction, so its adapter shapes are ours).
  """
  inputs, out = equation.split("->")
  lhs, rhs = inputs.split(",")
  if "L" in equation:
    raise ValueError(f"The LoRA label L is already used in {equation!r}.")
  in_label, out_label = rhs[-2], rhs[-1]
  a_rhs, a_out = rhs.replace(out_label, "L"), out.replace(out_label, "L")
  return f"{lhs},{a_rhs}->{a_out}", f"{a_out},{rhs.replace(in_label, 'L')}->{out}"


def get_variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f"Unknown Gemma variant {name!r}; known: {sorted(VARIANTS)}.")
  return VARIANTS[name]


def _suffixed(name: str, stream: int) -> str:
  # The VLM keeps PaliGemma's names so PaliGemma checkpoints load as they are.
  return name if stream == _VLM else f"{name}_{stream}"


class RMSNorm(nn.Module):
  """RMSNorm as x * (1 + scale); adaptive when given a condition.

  Adaptive (the action expert, conditioned on flow time): a zero-initialised Dense of the condition
  gives scale, shift and a gate for the residual branch (zero at initialisation, so each expert
  block starts as the identity). Returns (normed [B, T, D], gate [B, 1, D] or None).
  """

  adaptive: bool = False

  @nn.compact
  def __call__(self, x, cond=None):
    dtype = x.dtype
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x * jnp.reciprocal(jnp.sqrt(variance + 1e-6))  # float32
    if not self.adaptive:
      scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
      return (normed * (1 + scale)).astype(dtype), None
    if cond is None:
      raise ValueError("An adaptive RMSNorm needs its condition (the flow-time embedding).")
    modulation = nn.Dense(3 * x.shape[-1], kernel_init=nn.initializers.zeros, dtype=dtype)(cond)
    scale, shift, gate = jnp.split(modulation[:, None, :], 3, axis=-1)
    return (normed * (1 + scale) + shift).astype(dtype), gate


class Einsum(nn.Module):
  """A weight `w` of the given shape, applied with an einsum in the input's dtype."""

  shape: tuple[int, ...]
  init_fn: nn.initializers.Initializer
  lora: LoRA | None = None

  @nn.compact
  def __call__(self, equation, x):
    w = self.param("w", self.init_fn, self.shape)
    y = jnp.einsum(equation, x, w.astype(x.dtype))
    if self.lora is None:
      return y
    rank = self.lora.rank
    a = self.param("lora_a", LORA_INIT, (*self.shape[:-1], rank))
    b = self.param("lora_b", LORA_INIT, (*self.shape[:-2], rank, self.shape[-1]))
    eqn_a, eqn_b = lora_equations(equation)
    low_rank = jnp.einsum(eqn_b, jnp.einsum(eqn_a, x, a.astype(x.dtype)), b.astype(x.dtype))
    return y + low_rank * jnp.asarray(self.lora.scale, x.dtype)


class FeedForward(nn.Module):
  """GeGLU MLP: (gelu(x W_gate) * x W_up) W_down."""

  width: int
  mlp_dim: int
  lora: LoRA | None = None

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    dtype = x.dtype
    gating = self.param(
      "gating_einsum",
      nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
      (2, self.width, self.mlp_dim),
    ).astype(dtype)
    linear = self.param(
      "linear", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1), (self.mlp_dim, self.width)
    ).astype(dtype)
    if self.lora is None:
      hidden = nn.gelu(jnp.dot(x, gating[0])) * jnp.dot(x, gating[1])
      return jnp.dot(hidden, linear)
    # openpi's FFN adapters: unscaled, gate and up projections each with their own pair.
    rank = self.lora.rank
    gating_a = self.param("gating_einsum_lora_a", LORA_INIT, (2, self.width, rank)).astype(dtype)
    gating_b = self.param("gating_einsum_lora_b", LORA_INIT, (2, rank, self.mlp_dim)).astype(dtype)
    linear_a = self.param("linear_lora_a", LORA_INIT, (self.mlp_dim, rank)).astype(dtype)
    linear_b = self.param("linear_lora_b", LORA_INIT, (rank, self.width)).astype(dtype)

    def dot(x, w, a, b):
      return jnp.dot(x, w) + jnp.dot(jnp.dot(x, a), b)

    hidden = nn.gelu(dot(x, gating[0], gating_a[0], gating_b[0])) * dot(
      x, gating[1], gating_a[1], gating_b[1]
    )
    return dot(hidden, linear, linear_a, linear_b)


def apply_rope(x, positions, max_wavelength=10_000):
  """Rotary embedding of x [B, T, N, H] at integer positions [B, T] (computed in float32)."""
  freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
  timescale = max_wavelength**freq_exponents
  radians = positions[..., None, None].astype(jnp.float32) / timescale  # [B, T, 1, H/2]
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ATTENTION_IMPLS = ("einsum", "dot_product_attention")


def _attend(q, k, v, mask, impl="einsum"):
  """Masked multi-query attention.

  q [B, T, N, H] (already scaled); k, v [B, S, K, H]; mask [B, T, S].

  "einsum" is openpi's arithmetic (fp32 logits, finite big negative for masked keys).
  "dot_product_attention" hands the same computation to jax.nn.dot_product_attention, which picks
  a fused kernel (cuDNN flash attention on GPUs where shapes and dtypes fit, XLA elsewhere).
  Returns [B, T, N, H].
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if mask.shape != (batch, length, k.shape[1]):
    raise ValueError(
      f"Attention mask {mask.shape} does not fit queries {q.shape} and keys {k.shape}."
    )
  if impl == "dot_product_attention":
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0)
  q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, None, :, :], logits, _BIG_NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
  return encoded.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
  """Joint attention of the two streams (see the module docstring for who reads whom)."""

  variants: tuple[Variant, Variant]
  knowledge_insulation: bool
  attention_impl: str = "einsum"
  loras: tuple[LoRA | None, LoRA | None] = (None, None)

  @nn.compact
  def __call__(self, xs, positions, masks, context_kv):
    """One layer's attention.

    Args:
      xs: per stream [B, T_i, D_i] or None when the stream is absent in this pass.
      positions: per stream [B, T_i] int RoPE positions (or None).
      masks: per stream [B, T_i, S_i] bool over that stream's keys (see module docstring).
      context_kv: (k, v) each [B, S_ctx, K, H] from an earlier pass, or None.

    Returns:
      (outputs per stream [B, T_i, D_i] or None, this pass's VLM (k, v) or None).
    """
    qkv = [None, None]
    for stream, (x, variant) in enumerate(zip(xs, self.variants)):
      if x is None:
        continue
      q = Einsum(
        (variant.num_heads, variant.width, variant.head_dim),
        nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
        name=_suffixed("q_einsum", stream),
        lora=self.loras[stream],
      )("BTD,NDH->BTNH", x)
      k, v = Einsum(
        (2, variant.num_kv_heads, variant.width, variant.head_dim),
        nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
        name=_suffixed("kv_einsum", stream),
        lora=self.loras[stream],
      )("BSD,2KDH->2BSKH", x)
      q = apply_rope(q, positions[stream]) * jnp.asarray(variant.head_dim**-0.5, q.dtype)
      k = apply_rope(k, positions[stream])
      qkv[stream] = (q, k, v)

    # The keys each stream's queries read, in order.
    vlm_keys = [context_kv] if context_kv is not None else []
    if qkv[_VLM] is not None:
      vlm_keys.append(qkv[_VLM][1:])
    insulate = jax.lax.stop_gradient if self.knowledge_insulation else (lambda kv: kv)
    expert_keys = [insulate(kv) for kv in vlm_keys]
    if qkv[_EXPERT] is not None:
      expert_keys.append(qkv[_EXPERT][1:])

    outputs = [None, None]
    for stream, keys in ((_VLM, vlm_keys), (_EXPERT, expert_keys)):
      if qkv[stream] is None:
        continue
      k = jnp.concatenate([kv[0] for kv in keys], axis=1)
      v = jnp.concatenate([kv[1] for kv in keys], axis=1)
      encoded = _attend(qkv[stream][0], k, v, masks[stream], self.attention_impl)
      variant = self.variants[stream]
      outputs[stream] = Einsum(
        (variant.num_heads, variant.head_dim, variant.width),
        nn.initializers.lecun_normal(in_axis=(-3, -2), out_axis=-1),
        name=_suffixed("attn_vec_einsum", stream),
        lora=self.loras[stream],
      )("BTNH,NHD->BTD", encoded)
    fresh_vlm_kv = qkv[_VLM][1:] if qkv[_VLM] is not None else None
    return outputs, fresh_vlm_kv


class Block(nn.Module):
  """One transformer layer for both streams; the scan carry is the pair of residual streams."""

  variants: tuple[Variant, Variant]
  knowledge_insulation: bool
  attention_impl: str = "einsum"
  loras: tuple[LoRA | None, LoRA | None] = (None, None)

  @nn.compact
  def __call__(self, xs, context_kv, positions, masks, cond):
    adaptive = (False, True)  # the expert's norms are conditioned on flow time
    conds = (None, cond)

    normed, gates = [None, None], [None, None]
    for s, x in enumerate(xs):
      if x is not None:
        normed[s], gates[s] = RMSNorm(adaptive[s], name=_suffixed("pre_attention_norm", s))(
          x, conds[s]
        )
    attended, fresh_kv = Attention(
      self.variants, self.knowledge_insulation, self.attention_impl, self.loras, name="attn"
    )(normed, positions, masks, context_kv)
    xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, attended, gates)]

    out = [None, None]
    for s, x in enumerate(xs):
      if x is not None:
        y, gates[s] = RMSNorm(adaptive[s], name=_suffixed("pre_ffw_norm", s))(x, conds[s])
        y = FeedForward(
          self.variants[s].width, self.variants[s].mlp_dim, self.loras[s], name=_suffixed("mlp", s)
        )(y)
        out[s] = _gated_residual(x, y, gates[s])
    return tuple(out), fresh_kv


def _gated_residual(x, y, gate):
  if x is None:
    return None
  return x + y if gate is None else x + y * gate


class Embedder(nn.Module):
  vocab_size: int
  width: int

  def setup(self):
    self.input_embedding = self.param(
      "input_embedding", nn.initializers.normal(), (self.vocab_size, self.width)
    )

  def encode(self, tokens):  # [B, T] int -> [B, T, D]
    x = self.input_embedding[(tokens,)]
    return x * jnp.sqrt(self.width).astype(x.dtype)

  def decode(self, x):  # [B, T, D] -> [B, T, V] float32 logits, tied to the input table
    return jnp.dot(x.astype(jnp.float32), self.input_embedding.T)


class Gemma(nn.Module):
  """The two-stream transformer.

  Parameters: embedder, layers (scanned), final_norm, final_norm_1.
  """

  vlm_variant: str
  expert_variant: str
  vocab_size: int
  dtype: str = "bfloat16"
  knowledge_insulation: bool = True
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "einsum"
  loras: tuple[LoRA | None, LoRA | None] = (None, None)  # per stream; None = no adapters

  def setup(self):
    variants = (get_variant(self.vlm_variant), get_variant(self.expert_variant))
    self.embedder = Embedder(self.vocab_size, variants[_VLM].width)
    block = Block
    if self.remat_policy != "none":
      block = nn.remat(
        Block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, self.remat_policy)
      )
    self.layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),  # context_kv is per layer
      length=variants[_VLM].depth,
    )(
      variants=variants,
      knowledge_insulation=self.knowledge_insulation,
      attention_impl=self.attention_impl,
      loras=self.loras,
    )
    self.final_norm = RMSNorm(adaptive=False)
    self.final_norm_1 = RMSNorm(adaptive=True)

  def embed(self, tokens):
    return self.embedder.encode(tokens).astype(self.dtype)

  def logits(self, hidden):
    return self.embedder.decode(hidden)

  def __call__(
    self,
    xs: Sequence,
    *,
    positions: Sequence,
    masks: Sequence,
    cond=None,
    context_kv=None,
  ):
    """Runs all layers.

    Args:
      xs: (VLM tokens [B, Tv, Dv] or None, expert tokens [B, Te, De] or None).
      positions: per stream [B, T_i] int, or None for an absent stream.
      masks: per stream [B, T_i, S_i] bool (see module docstring for the key order).
      cond: [B, De] flow-time condition of the expert's adaptive norms (needed with the expert).
      context_kv: (k, v) each [L, B, S_ctx, K, H] from an earlier pass, or None.

    Returns:
      (final-normed outputs per stream, the VLM's fresh (k, v) each [L, B, Tv, K, H] or None).
    """
    xs = tuple(None if x is None else x.astype(self.dtype) for x in xs)
    xs, fresh_kv = self.layers(xs, context_kv, tuple(positions), tuple(masks), cond)
    vlm_out = None if xs[_VLM] is None else self.final_norm(xs[_VLM])[0]
    expert_out = None if xs[_EXPERT] is None else self.final_norm_1(xs[_EXPERT], cond)[0]
    return (vlm_out, expert_out), fresh_kv
