r"""pi0.5 with Knowledge Insulation on DROID: both losses (FAST CE + flow matching), stop-gradient.

Variants:
  full   pi0.5 sizes (Gemma 2B + Gemma 300M expert + SigLIP So400m/14) on prepared DROID, with
         openpi's DROID fine-tune settings as the starting point: 8-dim joint-position actions
         padded to 32, horizon 16, batch 256, AdamW b=(0.9, 0.95), 1k warmup, lr 5e-5, FSDP over
         every device. Initialised from an openpi pi0.5 checkpoint (or a PaliGemma .npz with
         init.kind=paligemma). One difference from openpi: gradients are clipped to norm 1.0
         per optimizer group, not over all parameters together (--config.optimizer.clip=global
         is openpi's), so that the VLM's update is the token loss's alone.
           python -m ki.main --config=experiments/droid_ki.py:full --workdir=/ckpt/ki_droid \
             --config.data.arrayrecord_dir=/data/droid_ar/train \
             --config.assets.norm_stats=/data/droid_ar/norm_stats.json \
             --config.assets.fast_tokenizer=/data/droid_ar/fast \
             --config.assets.prompt_tokenizer=/data/paligemma_tokenizer.model \
             --config.init.path=/ckpt/openpi/pi05_base
         Expect ~11 TFLOP per example (MFU is logged); openpi's fine-tune runs ~18.5 examples/s
         per H100. token_ce falls quickly (FAST tokens are easy to predict early), flow_mse more
         slowly; the language-retention eval (eval/vlm/text_ce) should stay flat.
  medium pi0.5's proportions scaled down (~90M parameters: Gemma "small" 512-wide VLM, a
         256-wide expert, 8 layers each; SigLIP S/16 at 112 px) on a larger synthetic DROID
         (480 episodes, 3,600 scene questions; generated on first use into
         $KI_CACHE/medium), batch 64, bf16: the size for one GPU, where the tiny model says too
         little (the KI ablation's GPU mode, python -m ki.ablation --size=medium):
           python -m ki.main --config=experiments/droid_ki.py:medium --workdir=/tmp/ki_medium
  smoke  a tiny model on synthetic DROID, generated on first use into $KI_CACHE/smoke ($KI_CACHE
         defaults to ~/.cache/ki): a few hundred steps on a 2-core CPU in about five minutes,
         both losses clearly falling. `make demo` runs it:
           python -m ki.main --config=experiments/droid_ki.py:smoke --workdir=/tmp/ki_demo

Every field is plain data; override any with --config.a.b=value.
"""

import os

import ml_collections

from ki.model import sizes
from ki.train import config as config_lib

# The synthetic-data variants: how much data each generates on first use (into $KI_CACHE/<variant>).
SYNTHETIC_DATA = {
  "smoke": dict(episodes=48, vlm_images=120),
  "medium": dict(episodes=480, vlm_images=1200),
}


def cache_dir(variant: str) -> str:
  """Where a synthetic variant keeps its data, pretrained VLM and compile cache."""
  return os.path.join(os.environ.get("KI_CACHE", os.path.expanduser("~/.cache/ki")), variant)


def base_config() -> ml_collections.ConfigDict:
  """The full-size run on prepared DROID, initialised from openpi's pi0.5; variants change what
  they need. Optimizer, clip norm and schedule are openpi's DROID fine-tune (ki.train.config);
  the clip is per group (openpi's is global)."""
  config = config_lib.default_config()
  config.init.kind = "openpi"
  # Each group's gradient clipped by its own norm: under the stop-gradient the VLM's gradient is
  # the token loss's alone, and so is its update (a global clip would scale it by the expert's
  # flow gradient). KI's VLM trains exactly as a token-loss-only run's on the same batches.
  config.optimizer.clip = "per_group"
  # One process decodes + augments ~200 examples/s (benchmarks/data_bench.py); 8 H100s at the
  # target throughput need ~300/s per host, so 8 workers leave headroom.
  config.data.num_workers = 8
  return config


def synthetic_run(config: ml_collections.ConfigDict, variant: str, cache: str, **model) -> None:
  """What every synthetic-data variant (here and experiments/libero_ki.py) shares: one device
  axis, the model size `variant` (with `model` overrides), training from scratch, the generated
  assets, co-training and language eval in `cache`, and the size's steps, batch and schedule."""
  config.mesh = (("data", -1), ("fsdp", 1))
  config.fsdp_min_size_bytes = 2**20
  config.compilation_cache_dir = os.path.join(cache, "jax_cache")
  config.init.kind = "scratch"
  config.model = ml_collections.ConfigDict(sizes.fields(variant, **model))
  config.assets.norm_stats = os.path.join(cache, "norm_stats.json")
  config.assets.fast_tokenizer = os.path.join(cache, "fast_tokenizer")
  config.assets.prompt_tokenizer = os.path.join(cache, "tokenizer.model")
  config.eval.vlm_heldout = os.path.join(cache, "vlm", "heldout.jsonl")
  config.data.augment = False
  config.data.vlm_sources = (
    {"kind": "jsonl", "path": os.path.join(cache, "vlm", "train.jsonl"), "weight": 0.2},
  )
  config.update_from_flattened_dict(_RUNS[variant])
  config.optimizer.groups = _groups(**_SCHEDULES[variant])


def _groups(**settings) -> dict:
  group = dict(config_lib.OPENPI_GROUP, **settings)
  return dict(vlm=dict(group), action_expert=dict(group))


# Steps, batch, data workers, checkpoints, logging and evaluation of the synthetic sizes.
_RUNS = {
  "smoke": {
    "total_steps": 400,
    "batch_size": 16,
    "data.num_workers": 0,
    "data.read_threads": 1,
    "checkpoint.every": 100,
    "checkpoint.max_to_keep": 2,
    "checkpoint.keep_period": 0,
    "log_every": 20,
    "eval.every": 200,
    "eval.batch_size": 16,
    "eval.max_batches": 4,
  },
  "medium": {
    "total_steps": 3_000,
    "batch_size": 64,
    "data.num_workers": 8,  # ~200 examples/s per worker; a GPU step takes tens of ms
    "checkpoint.every": 1_000,
    "checkpoint.max_to_keep": 2,
    "checkpoint.keep_period": 0,
    "log_every": 50,
    "eval.every": 500,
    "eval.batch_size": 64,
    "eval.max_batches": 4,
  },
}
_SCHEDULES = {
  "smoke": dict(peak_lr=1e-3, warmup_steps=20, decay_steps=400, end_lr=1e-4, weight_decay=1e-4),
  "medium": dict(peak_lr=3e-4, warmup_steps=100, decay_steps=3_000, end_lr=3e-5, weight_decay=1e-4),
}


def _synthetic_config(variant: str) -> ml_collections.ConfigDict:
  config = base_config()
  cache = cache_dir(variant)
  synthetic_run(config, variant, cache)
  config.synthetic_data.update(dict(dir=cache, **SYNTHETIC_DATA[variant]))
  config.data.arrayrecord_dir = os.path.join(cache, "arrayrecord", "train")
  config.data.eval_arrayrecord_dir = os.path.join(cache, "arrayrecord", "eval")
  return config


VARIANTS = {
  "full": base_config,
  "medium": lambda: _synthetic_config("medium"),
  "smoke": lambda: _synthetic_config("smoke"),
}


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of droid_ki; choose from {sorted(VARIANTS)}.")
  config = VARIANTS[variant]()
  config.lock()
  return config
