"""Model sizes by name: overrides of `pi05.Config`'s defaults (pi0.5 as openpi ships it).

Experiment files name a size (`sizes.fields("medium")`) and change what they need; the
benchmarks measure the same table. Smallest first.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

from ki import batch as batch_lib
from ki.model import pi05
from ki.tokenizers import prompt

# The synthetic data's SentencePiece model (ki's synthetic DROID): 1024 text pieces, then
# PaliGemma's <loc> and <seg> pieces.
SYNTHETIC_TEXT_PIECES = 1024
SYNTHETIC_VOCAB_SIZE = SYNTHETIC_TEXT_PIECES + prompt.NUM_LOC_PIECES + prompt.NUM_SEG_PIECES

SIZES: Mapping[str, Mapping[str, Any]] = {
  # Compiles in seconds on a CPU: benchmarks' quick mode.
  "tiny": dict(
    vlm_variant="tiny",
    expert_variant="tiny",
    siglip_variant="mu/16",
    image_size=32,
    max_token_len=48,
    max_loss_tokens=16,
    vocab_size=SYNTHETIC_VOCAB_SIZE,
    dtype="float32",
    remat_policy="none",
  ),
  # The smoke experiment (`make demo`): a few hundred steps on a 2-core CPU in minutes.
  "smoke": dict(
    vlm_variant="dummy",
    expert_variant="dummy",
    siglip_variant="mu/16",
    image_size=64,
    action_horizon=8,
    max_token_len=96,
    max_loss_tokens=40,
    vocab_size=SYNTHETIC_VOCAB_SIZE,
    dtype="float32",
    remat_policy="none",
  ),
  # The CPU KI ablation (experiments/ki_ablation.py): the smoke model with a VLM twice as wide as
  # its expert (pi0.5's VLM is ~7x its expert), so the VLM has capacity of its own to lose.
  "ablation": dict(
    vlm_variant="mini",
    expert_variant="dummy",
    # One camera, 16 image tokens: the prompt (80 tokens) already dominates the step on a CPU.
    siglip_variant="mu/16",
    image_keys=(batch_lib.BASE_SLOT,),
    image_size=64,
    action_horizon=8,
    max_token_len=80,
    max_loss_tokens=36,
    vocab_size=SYNTHETIC_VOCAB_SIZE,
    dtype="float32",
    remat_policy="none",
  ),
  # Meta-World on the 2-core CPU (experiments/metaworld_ki.py:cpu): the ablation's VLM and expert,
  # one 128 px camera (64 image tokens: Meta-World's goal markers are ~17 px at 128, 2 px at 64),
  # Meta-World's 4-D actions in chunks of 16 (0.2 s at 80 Hz).
  "metaworld_cpu": dict(
    vlm_variant="mini",
    expert_variant="dummy",
    siglip_variant="mu/16",
    image_keys=(batch_lib.BASE_SLOT,),
    image_size=128,
    action_horizon=16,
    data_action_dim=4,
    max_token_len=80,
    max_loss_tokens=50,
    vocab_size=SYNTHETIC_VOCAB_SIZE,
    dtype="float32",
    remat_policy="none",
  ),
  # pi0.5's proportions scaled down, ~90M parameters: Gemma "small" 512-wide VLM, a 256-wide
  # expert, 8 layers each; SigLIP S/16 at 112 px. The size for one GPU.
  "medium": dict(
    vlm_variant="small",
    expert_variant="small_expert",
    siglip_variant="S/16",
    image_size=112,
    max_token_len=128,
    max_loss_tokens=64,
    vocab_size=SYNTHETIC_VOCAB_SIZE,
    dtype="bfloat16",
    remat_policy="none",
  ),
  # Gemma 300M in both streams with the full SigLIP: ~1.3B parameters.
  "gemma_300m": dict(vlm_variant="gemma_300m"),
  # pi0.5: Gemma 2B + Gemma 300M expert + SigLIP So400m/14 (pi05.Config's defaults).
  "full": {},
}


def fields(size: str, **overrides) -> dict[str, Any]:
  """The model-config fields of a size, with `overrides` applied: every pi05.Config field except
  fast_loss, which is not a size but a training decision (ki.train.setup derives it from
  loss.token_weight, so a config has one knob for it)."""
  if size not in SIZES:
    raise ValueError(f"Unknown model size {size!r}; choose from {list(SIZES)}.")
  result = {f.name: f.default for f in dataclasses.fields(pi05.Config) if f.name != "fast_loss"}
  result.update(SIZES[size])
  result.update(overrides)
  return result
