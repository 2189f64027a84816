"""SigLIP image encoder: big_vision's ViT, with its variant names and parameter layout.

PaliGemma (and so pi0.5) uses "So400m/14" at 224x224: 16x16 = 256 patch tokens of width 1152,
projected by `head` to the language model's width. Parameter names follow big_vision exactly
(`embedding`, `pos_embedding`, `Transformer/encoderblock/...`, `Transformer/encoder_norm`, `head`)
so big_vision/openpi checkpoints load unchanged. The blocks are scanned: every encoder parameter
carries a leading layer axis.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# big_vision's ViT variant table (vit.py `decode_variant`), the sizes used here.
_WIDTH = {"mu": 32, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152}
_DEPTH = {"mu": 1, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27}
_MLP_DIM = {"mu": 128, "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "So400m": 4304}
_NUM_HEADS = {"mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16}


@dataclasses.dataclass(frozen=True)
class Variant:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int


def get_variant(name: str) -> Variant:
  """Decodes a big_vision variant name such as "So400m/14" or "mu/16"."""
  if "/" not in name:
    raise ValueError(f"SigLIP variant {name!r} must look like 'So400m/14' (size/patch).")
  size, patch = name.split("/")
  if size not in _WIDTH:
    raise ValueError(f"Unknown SigLIP size {size!r} in {name!r}; known: {sorted(_WIDTH)}.")
  return Variant(_WIDTH[size], _DEPTH[size], _MLP_DIM[size], _NUM_HEADS[size], int(patch))


def num_tokens(name: str, image_size: int = 224) -> int:
  """Number of patch tokens one image becomes."""
  patch = get_variant(name).patch_size
  return (image_size // patch) ** 2


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype_mm: str

  @nn.compact
  def __call__(self, x):  # [B, L, D] -> [B, L, D]
    inits = dict(
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
    )
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype_mm, **inits)(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype_mm, **inits)(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block; the scan carries x and emits nothing."""

  mlp_dim: int
  num_heads: int
  dtype_mm: str

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
      dtype=self.dtype_mm,
    )(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype_mm=self.dtype_mm)(y)
    return x, None


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dtype_mm: str
  remat_policy: str

  @nn.compact
  def __call__(self, x):
    block = EncoderBlock
    if self.remat_policy != "none":
      block = nn.remat(
        EncoderBlock, prevent_cse=False, policy=getattr(jax.checkpoint_policies, self.remat_policy)
      )
    x, _ = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=nn.broadcast,
      length=self.depth,
    )(
      name="encoderblock", mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype_mm=self.dtype_mm
    )(x, None)
    return nn.LayerNorm(name="encoder_norm")(x)


class SigLIP(nn.Module):
  """ViT without pooling: images [B, H, W, 3] in [-1, 1] -> tokens [B, N, out_width].

  Attributes:
    variant: big_vision name, e.g. "So400m/14".
    out_width: width of the `head` projection (the language model's width).
    dtype_mm: dtype of the matrix multiplications (parameters stay float32).
  """

  variant: str
  out_width: int
  dtype_mm: str = "bfloat16"
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, image):
    v = get_variant(self.variant)
    image = jnp.asarray(image, self.dtype_mm)
    x = nn.Conv(
      v.width,
      (v.patch_size, v.patch_size),
      strides=(v.patch_size, v.patch_size),
      padding="VALID",
      name="embedding",
      dtype=self.dtype_mm,
    )(image)
    batch, height, width, channels = x.shape
    x = jnp.reshape(x, [batch, height * width, channels])
    pos_embedding = self.param(
      "pos_embedding",
      nn.initializers.normal(stddev=1 / np.sqrt(channels)),
      (1, height * width, channels),
      jnp.float32,
    )
    x = x + pos_embedding.astype(x.dtype)
    x = Encoder(
      depth=v.depth,
      mlp_dim=v.mlp_dim,
      num_heads=v.num_heads,
      dtype_mm=self.dtype_mm,
      remat_policy=self.remat_policy,
      name="Transformer",
    )(x)
    # big_vision initialises the head to zero; PaliGemma checkpoints overwrite it.
    return nn.Dense(
      self.out_width, dtype=self.dtype_mm, kernel_init=nn.initializers.zeros, name="head"
    )(x)
