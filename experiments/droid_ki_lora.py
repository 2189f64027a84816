r"""pi0.5-KI on DROID with LoRA: the language model's base weights frozen, low-rank adapters on
both streams' attention and MLP (openpi's gemma_2b_lora rank 16 and gemma_300m_lora rank 32,
alpha = rank), KI unchanged: the VLM's adapters learn from the token loss only, the expert's from
the flow loss only. SigLIP, the action projections and the time MLP still train, as in openpi's
LoRA configs. The variants are droid_ki's (same data, schedule and sizes):

  full   the fine-tune of experiments/droid_ki.py:full with adapters, for smaller accelerators:
           python -m ki.main --config=experiments/droid_ki_lora.py:full --workdir=/ckpt/ki_lora \
             --config.init.path=/ckpt/openpi/pi05_base   # + droid_ki's data/asset flags
         Check the memory first: python -m ki.compile_check \
             --config=experiments/droid_ki_lora.py:full --topology=v5e-8 --per_device_batch=4
  smoke  the tiny synthetic run with adapters (from scratch, so it exercises the mechanism only):
           python -m ki.main --config=experiments/droid_ki_lora.py:smoke --workdir=/tmp/ki_lora

Change the ranks with --config.model.vlm_lora_rank=... / expert_lora_rank (alpha: *_lora_alpha).
Serve or export with ki.model.lora.merge (adapters folded into openpi's layout).
"""

import ml_collections

from experiments import droid_ki
from ki.train import optimizer


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = droid_ki.get_config(variant)
  config.unlock()
  # openpi's ranks (ki.model.lora.OPENPI_RANKS: 16/16 on the VLM, 32/32 on the expert); the
  # adapters train with their stream's settings, the language model's base is frozen.
  optimizer.use_lora(config)
  config.lock()
  return config
