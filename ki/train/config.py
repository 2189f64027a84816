"""The training config every experiment starts from: each field `ki.main` reads, with defaults.

Experiment files (experiments/*.py) take `default_config()`, change what they need and lock it.
The defaults are full-size pi0.5 fine-tuning with openpi's DROID settings (pi05_droid_finetune):
AdamW b=(0.9, 0.95), weight decay 1e-10, 1k warm-up to 5e-5 then a cosine that barely decays,
gradients clipped to global norm 1.0 over all parameters, FSDP over every device.

Every field can be overridden on ki.main's command line (--config.a.b=value): a field that may be
unset is a typed placeholder (`config_dict.placeholder(type)`), never a bare None, which
ml_collections could not parse a value for. Which fields may change when a run resumes is
ki/train/resume.py's table.
"""

import ml_collections
from ml_collections import config_dict

from ki.data import pipeline
from ki.model import sizes

# One optimizer group's settings (see ki/train/optimizer.py).
OPENPI_GROUP = dict(
  peak_lr=5e-5,
  warmup_steps=1_000,
  decay_steps=1_000_000,
  end_lr=5e-5,
  b1=0.9,
  b2=0.95,
  eps=1e-8,
  weight_decay=1e-10,
  frozen=False,
)


def default_config() -> ml_collections.ConfigDict:
  """Full-size pi0.5-KI; every field an experiment may set (unlocked: the caller locks it)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100_000
  config.batch_size = 256
  # The batch is split into this many micro-batches whose gradients are averaged.
  config.grad_accum_steps = 1
  # ("data", n) replicates parameters; ("fsdp", n) shards them (and the optimizer state).
  config.mesh = (("data", 1), ("fsdp", -1))
  config.fsdp_min_size_bytes = 4 * 2**20
  config.compilation_cache_dir = ""

  config.model = ml_collections.ConfigDict(sizes.fields("full"))
  # total = flow_weight * flow_mse + token_weight * token_ce, each averaged over the examples that
  # carry it (the KI paper: 1 and 1). token_ce is the VLM's next-token loss: the FAST postfix of
  # robot examples and the answers of co-training examples. token_weight=0 turns it off (plain
  # pi0.5: no logits computed, robot prompts without FAST postfix).
  config.loss = ml_collections.ConfigDict(dict(flow_weight=1.0, token_weight=1.0))
  config.optimizer = ml_collections.ConfigDict(
    dict(
      # A name in ki.model.params.GROUP_RULES, or a tuple of (regex, group) pairs.
      group_rules="pi05",
      groups=dict(vlm=dict(OPENPI_GROUP), action_expert=dict(OPENPI_GROUP)),
      # Gradients are clipped to this norm (0 = off), in the structure `clip` names
      # (ki.train.optimizer.CLIPS): "global" = all trainable parameters' gradient together, as
      # openpi; "per_group" = each optimizer group's gradient by its own norm, so that under
      # knowledge insulation the VLM's update is the token loss's alone (the global clip would
      # rescale it by the expert's flow gradient). The KI experiment files use "per_group".
      clip_norm=1.0,
      clip="global",
      # Off (None) or the decay of an EMA of the weights, which checkpoints then serve. A typed
      # placeholder, so that --config.optimizer.ema_decay=0.999 can switch it on.
      ema_decay=config_dict.placeholder(float),
    )
  )
  # kind: scratch | openpi | paligemma | ki (see ki/model/weights.py).
  # fresh_expert: load only the VLM from init.path; the action expert keeps the fresh
  # initialisation drawn from config.seed (as for a PaliGemma checkpoint).
  config.init = ml_collections.ConfigDict(
    dict(kind="scratch", path="", cast_dtypes=True, fresh_expert=False)
  )
  config.data = pipeline.default_config()
  config.assets = ml_collections.ConfigDict(
    dict(norm_stats="", fast_tokenizer="", prompt_tokenizer="")
  )
  # Synthetic DROID generated on first use into `dir` (the smoke and medium experiments):
  # dir "" = real data at the paths above. eval_shards: shards of 8 episodes held out for eval.
  config.synthetic_data = ml_collections.ConfigDict(
    dict(dir="", episodes=0, vlm_images=0, eval_shards=1)
  )
  config.checkpoint = ml_collections.ConfigDict(
    dict(every=1_000, max_to_keep=3, keep_period=10_000, asynchronous=True)
  )
  config.log_every = 50
  # vlm_heldout: a JSONL manifest of held-out co-training examples ('' = no language eval).
  config.eval = ml_collections.ConfigDict(
    dict(every=5_000, batch_size=256, max_batches=8, flow_steps=10, vlm_heldout="")
  )
  # Closed-loop success in a simulator beside the losses (ki/eval/metaworld.py): every `every`
  # steps (0 = off) and at the end, `episodes_per_task` episodes of each task of `suite` (mt10,
  # mt50 or task names) in `num_envs` simulator processes; eval/sim/success (the average) and
  # eval/sim/success/<task> in TensorBoard. The policy's state (4-D or 39-D) follows
  # data.robot.state_key. Single-process runs (the params must be on one host).
  config.eval.sim = ml_collections.ConfigDict(
    dict(
      every=0,
      suite="mt10",
      episodes_per_task=2,
      max_steps=400,
      execute_steps=8,
      num_envs=2,
      seed=1,
      image_size=128,
    )
  )
  return config
