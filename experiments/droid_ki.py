r"""pi0.5 with Knowledge Insulation on DROID: both losses (FAST CE + flow matching), stop-gradient.

Variants:
  full   pi0.5 sizes (Gemma 2B + Gemma 300M expert + SigLIP So400m/14) on prepared DROID, with
         openpi's DROID fine-tune settings as the starting point: 8-dim joint-position actions
         padded to 32, horizon 16, batch 256, AdamW b=(0.9, 0.95), clip 1.0, 1k warmup, lr 5e-5,
         FSDP over every device. Initialised from an openpi pi0.5 checkpoint (or a PaliGemma
         .npz with init.kind=paligemma).
           python -m ki.main --config=experiments/droid_ki.py:full --workdir=/ckpt/ki_droid \
             --config.data.arrayrecord_dir=/data/droid_ar/train \
             --config.assets.norm_stats=/data/droid_ar/norm_stats.json \
             --config.assets.fast_tokenizer=/data/droid_ar/fast \
             --config.assets.prompt_tokenizer=/data/paligemma_tokenizer.model \
             --config.init.path=/ckpt/openpi/pi05_base
         Expect ~11 TFLOP per example (MFU is logged); openpi's fine-tune runs ~18.5 examples/s
         per H100. fast_ce falls quickly (FAST tokens are easy to predict early), flow_mse more
         slowly; the language-retention eval (eval/vlm/text_ce) should stay flat.
  medium pi0.5's proportions scaled down (~90M parameters: Gemma "small" 512-wide VLM, a
         256-wide expert, 8 layers each; SigLIP S/16 at 112 px) on a larger synthetic DROID
         (480 episodes, 3,600 scene questions; generated on first use into
         $KI_CACHE/medium), batch 64, bf16: the size for one GPU, where the tiny model says too
         little (the KI ablation's GPU mode, experiments/ki_ablation.py --size=medium):
           python -m ki.main --config=experiments/droid_ki.py:medium --workdir=/tmp/ki_medium
  smoke  a tiny model on synthetic DROID, generated on first use into $KI_CACHE/smoke ($KI_CACHE
         defaults to ~/.cache/ki): a few hundred steps on a 2-core CPU in about five minutes,
         both losses clearly falling. `make demo` runs it:
           python -m ki.main --config=experiments/droid_ki.py:smoke --workdir=/tmp/ki_demo

Every field is plain data; override any with --config.a.b=value.
"""

import os

import ml_collections

# openpi's DROID fine-tune optimizer (pi05_droid_finetune): AdamW with a tiny weight decay, global
# norm clipping, 1k warmup to 5e-5 then a slow cosine that barely decays over a run.
_FULL_GROUP = dict(
  peak_lr=5e-5,
  warmup_steps=1_000,
  decay_steps=1_000_000,
  end_lr=5e-5,
  b1=0.9,
  b2=0.95,
  eps=1e-8,
  weight_decay=1e-10,
  clip_norm=1.0,
  frozen=False,
)


# The synthetic-data variants: how much data each generates on first use (ki/train/demo_data.py).
SYNTHETIC_DATA = {
  "smoke": dict(episodes=48, vlm_images=120),
  "medium": dict(episodes=480, vlm_images=1200),
}


def cache_dir(variant: str) -> str:
  """Where a synthetic variant keeps its data, pretrained VLM and compile cache."""
  return os.path.join(os.environ.get("KI_CACHE", os.path.expanduser("~/.cache/ki")), variant)


def _data_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  from ki.data import pipeline  # pylint: disable=g-import-not-at-top

  data = pipeline.default_config()
  for field in ("action_dim", "action_horizon", "data_action_dim", "image_size"):
    data[field] = model[field]
  return data


def base_config() -> ml_collections.ConfigDict:
  """The full-size run; variants change what they need."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100_000
  config.batch_size = 256
  config.grad_accum_steps = 1
  # ("data", n) replicates parameters; ("fsdp", n) shards them (and the optimizer state).
  config.mesh = (("data", 1), ("fsdp", -1))
  config.fsdp_min_size_bytes = 4 * 2**20
  config.compilation_cache_dir = ""

  config.model = ml_collections.ConfigDict(
    dict(
      vlm_variant="gemma_2b",
      expert_variant="gemma_300m",
      siglip_variant="So400m/14",
      image_keys=("base_0_rgb", "left_wrist_0_rgb"),
      image_size=224,
      action_dim=32,
      data_action_dim=8,
      action_horizon=16,
      max_token_len=200,
      max_loss_tokens=64,
      vocab_size=257_152,
      knowledge_insulation=True,
      fast_loss=True,
      dtype="bfloat16",
      remat_policy="nothing_saveable",
    )
  )
  # total = flow_weight * flow_mse + fast_weight * fast_ce (the KI paper: 1 and 1).
  config.loss = ml_collections.ConfigDict(dict(flow_weight=1.0, fast_weight=1.0))
  config.optimizer = ml_collections.ConfigDict(
    dict(
      group_rules="pi05",
      groups=dict(vlm=dict(_FULL_GROUP), action_expert=dict(_FULL_GROUP)),
      ema_decay=None,
    )
  )
  # kind: scratch | openpi | paligemma | ki (see ki/model/weights.py).
  config.init = ml_collections.ConfigDict(dict(kind="openpi", path="", cast_dtypes=True))
  config.data = _data_config(config.model)
  # One process decodes + augments ~200 examples/s (benchmarks/data_bench.py); 8 H100s at the
  # target throughput need ~300/s per host, so 8 workers leave headroom.
  config.data.num_workers = 8
  config.assets = ml_collections.ConfigDict(
    dict(norm_stats="", fast_tokenizer="", prompt_tokenizer="")
  )
  # Synthetic DROID generated on first use into `dir` (smoke and medium runs only; see
  # ki/train/demo_data.py): dir "" = real data at the paths above.
  config.synthetic_data = ml_collections.ConfigDict(dict(dir="", episodes=0, vlm_images=0))
  config.checkpoint = ml_collections.ConfigDict(
    dict(every=1_000, max_to_keep=3, keep_period=10_000, asynchronous=True, params_item=True)
  )
  config.log_every = 50
  # vlm_heldout: a JSONL manifest of held-out co-training examples ('' = no language eval).
  config.eval = ml_collections.ConfigDict(
    dict(every=5_000, batch_size=256, max_batches=8, flow_steps=10, vlm_heldout="")
  )
  return config


def _synthetic_config(variant: str) -> ml_collections.ConfigDict:
  """The parts every synthetic-data variant shares: data, assets and evaluation in its cache."""
  config = base_config()
  cache = cache_dir(variant)
  config.mesh = (("data", -1), ("fsdp", 1))
  config.compilation_cache_dir = os.path.join(cache, "jax_cache")
  config.init.kind = "scratch"
  config.synthetic_data.update(dict(dir=cache, **SYNTHETIC_DATA[variant]))
  config.assets.norm_stats = os.path.join(cache, "norm_stats.json")
  config.assets.fast_tokenizer = os.path.join(cache, "fast_tokenizer")
  config.assets.prompt_tokenizer = os.path.join(cache, "tokenizer.model")
  config.eval.vlm_heldout = os.path.join(cache, "vlm", "heldout.jsonl")
  return config


def _synthetic_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data config of a synthetic variant (call after the model is final)."""
  cache = config.synthetic_data.dir
  data = _data_config(config.model)
  data.arrayrecord_dir = os.path.join(cache, "arrayrecord", "train")
  data.eval_arrayrecord_dir = os.path.join(cache, "arrayrecord", "eval")
  data.augment = False
  data.vlm_sources = (
    {"kind": "jsonl", "path": os.path.join(cache, "vlm", "train.jsonl"), "weight": 0.2},
  )
  return data


def smoke_config() -> ml_collections.ConfigDict:
  config = _synthetic_config("smoke")
  config.total_steps = 400
  config.batch_size = 16
  config.fsdp_min_size_bytes = 2**20
  config.model.update(
    dict(
      vlm_variant="dummy",
      expert_variant="dummy",
      siglip_variant="mu/16",
      image_size=64,
      action_dim=32,
      action_horizon=8,
      max_token_len=96,
      max_loss_tokens=40,
      vocab_size=1024 + 1152,
      dtype="float32",
      remat_policy="none",
    )
  )
  smoke_group = dict(
    _FULL_GROUP, peak_lr=1e-3, warmup_steps=20, decay_steps=400, end_lr=1e-4, weight_decay=1e-4
  )
  config.optimizer.groups = dict(vlm=dict(smoke_group), action_expert=dict(smoke_group))
  config.data = _synthetic_data(config)
  config.data.read_threads = 1
  config.checkpoint.update(dict(every=100, max_to_keep=2, keep_period=0))
  config.log_every = 20
  config.eval.update(dict(every=200, batch_size=16, max_batches=4))
  return config


# The medium model: overrides of the full model config (benchmarks/train_bench.py uses it too).
MEDIUM_MODEL = dict(
  vlm_variant="small",
  expert_variant="small_expert",
  siglip_variant="S/16",
  image_size=112,
  action_horizon=16,
  max_token_len=128,
  max_loss_tokens=64,
  vocab_size=1024 + 1152,
  dtype="bfloat16",
  remat_policy="none",
)


def medium_config() -> ml_collections.ConfigDict:
  config = _synthetic_config("medium")
  config.total_steps = 3_000
  config.batch_size = 64
  config.fsdp_min_size_bytes = 2**20
  config.model.update(MEDIUM_MODEL)
  medium_group = dict(
    _FULL_GROUP, peak_lr=3e-4, warmup_steps=100, decay_steps=3_000, end_lr=3e-5, weight_decay=1e-4
  )
  config.optimizer.groups = dict(vlm=dict(medium_group), action_expert=dict(medium_group))
  config.data = _synthetic_data(config)
  config.data.num_workers = 8  # ~200 examples/s per worker; a GPU step takes tens of ms
  config.checkpoint.update(dict(every=1_000, max_to_keep=2, keep_period=0))
  config.log_every = 50
  config.eval.update(dict(every=500, batch_size=64, max_batches=4))
  return config


VARIANTS = {"full": base_config, "medium": medium_config, "smoke": smoke_config}


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of droid_ki; choose from {sorted(VARIANTS)}.")
  config = VARIANTS[variant]()
  config.lock()
  return config
