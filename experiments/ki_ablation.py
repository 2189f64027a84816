r"""The KI ablation: does insulation work? A small, reproducible replication of the paper's claims.

The KI paper (Driess et al. 2025) claims that with the stop-gradient and FAST co-training
  (1) the VLM keeps its language ability, where joint training without the stop-gradient
      degrades it;
  (2) the action expert learns faster than flow-only pi0.5 training;
  (3) inference stays as fast as a flow-only model, far faster than autoregressive FAST decoding.
This experiment tests each on synthetic DROID, with the tiny model of the smoke variant (CPU) or
the ~90M-parameter model of the medium variant (pi0.5's proportions scaled down; one GPU):
  stage 1  the pretrained VLM (experiments/vlm_pretrain.py: the VLM alone, next-token loss on the
           synthetic scene questions) stands in for PaliGemma;
  stage 2  from that checkpoint, the arms below train with identical data, seeds, steps and
           optimizer; they differ ONLY in model.knowledge_insulation, loss.token_weight
           and data.vlm_sources (tests/experiments/test_ki_ablation.py checks it);
  stage 3  held-out evaluation along training (ki.train.evaluation): action error in raw units
           from sample_actions (10 Euler steps), FAST token accuracy, the VLM's held-out question
           loss (text_ce) and exact-match accuracy; steps to reach an action-error threshold; the
           latency of sample_actions against sample_fast (ki.serve.latency).

The runner, ki.ablation, loads this file by path and runs everything (synthetic data,
pretraining, arms, table and plots); on a CPU:
  python -m ki.ablation --out=/tmp/ki_ablation --seeds=0,1,2 --steps=150 \
    --eval_every=25      # ~20 min on a quiet 2-core CPU; the result is in docs/ablation/
  python -m ki.ablation --out=/tmp/ablation --quick   # minutes; what the test runs
and larger, on one GPU (480 synthetic episodes, 3,600 scene questions, batch 64, 3,000 steps per
arm after a 3,000-step VLM pretraining; the defaults of --size=medium):
  python -m ki.ablation --size=medium --out=/tmp/ki_ablation_medium
(on a GPU with less memory, e.g. --override=batch_size=32: --override=KEY=VALUE sets a config
field for the pretraining and every arm alike).
Outputs in --out: ablation.md (the table), curves.png, latency.png, results.json, runs/ (one
workdir per arm and seed; a finished run is reused when the command is repeated).

This file is plain configuration: the arms as data, each arm's config (`arm_config`,
`get_config`) and the pretraining's (`pretrain_config`); what ki.ablation reads from it is listed
in ki/ablation/runner.py.

One arm alone, through the training entry point (variant "smoke", "medium" or "full", then
",<arm>"; the synthetic variants start from $KI_CACHE/<variant>/vlm_pretrain by default):
  python -m ki.main --config=experiments/ki_ablation.py:smoke,joint_cotrain --workdir=/tmp/joint
"""

import os

import ml_collections

from experiments import droid_ki, vlm_pretrain

# Each arm's switches; everything else is shared. Co-training only matters where a token loss
# trains the VLM, so flow-only pi0.5 has no co-training arm (its VLM examples would carry no loss).
ARMS = {
  "ki_cotrain": dict(
    knowledge_insulation=True,
    token_loss=True,
    cotrain=True,
    label="KI (stop-grad + FAST + flow), co-training",
  ),
  "ki": dict(knowledge_insulation=True, token_loss=True, cotrain=False, label="KI, no co-training"),
  "joint_cotrain": dict(
    knowledge_insulation=False,
    token_loss=True,
    cotrain=True,
    label="joint, no stop-grad, co-training",
  ),
  "joint": dict(
    knowledge_insulation=False,
    token_loss=True,
    cotrain=False,
    label="joint, no stop-grad, no co-training",
  ),
  "flow_only": dict(
    knowledge_insulation=False, token_loss=False, cotrain=False, label="flow-only pi0.5"
  ),
}
# The only config fields the arms may differ in.
ARM_FIELDS = (
  "model.knowledge_insulation",
  "loss.token_weight",
  "data.vlm_sources",
)
QUICK_ARMS = ("ki_cotrain", "joint_cotrain")
# The sizes the runner trains (synthetic data, a pretrained VLM of its own) and their defaults.
SIZE_DEFAULTS = {
  "smoke": dict(steps=300, eval_every=50),
  "medium": dict(steps=3_000, eval_every=250),
}
COTRAIN_WEIGHT = 0.2  # VLM examples per robot example in the co-training arms (the smoke mixture)
# VLM pretraining steps per synthetic size (experiments/vlm_pretrain.py).
PRETRAIN_STEPS = dict(vlm_pretrain.STEPS)


def cache_dir(size: str) -> str:
  """Where a synthetic size keeps its data and pretrained VLM: $KI_CACHE/<size>."""
  return droid_ki.cache_dir(size)


def pretrain_workdir(size: str) -> str:
  """The pretrained VLM's workdir, which every arm of a synthetic size starts from."""
  return os.path.join(cache_dir(size), "vlm_pretrain")


def _fit_to_steps(config: ml_collections.ConfigDict, steps: int) -> None:
  """A short synthetic run: every schedule ends at `steps` (warm-up at most a tenth of it), and
  only the final checkpoint is kept."""
  config.total_steps = steps
  for group in config.optimizer.groups.values():
    group.decay_steps = steps
    group.warmup_steps = min(group.warmup_steps, max(steps // 10, 1))
  config.checkpoint.update(dict(every=steps, max_to_keep=1))


def arm_config(
  size: str,
  arm: str,
  *,
  init_path: str = "",
  seed: int = 0,
  total_steps: int | None = None,
  eval_every: int | None = None,
  overrides: dict | None = None,
) -> ml_collections.ConfigDict:
  """The config of one arm; `size` is droid_ki's variant ("smoke", "medium" or "full").
  `overrides` ({"a.b": value}) apply to every arm alike, before the ablation's own settings."""
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; choose from {sorted(ARMS)}.")
  switches = ARMS[arm]
  config = droid_ki.get_config(size)
  config.unlock()
  config.update_from_flattened_dict(overrides or {})
  config.seed = seed
  config.init.kind = "ki"
  synthetic = size in droid_ki.SYNTHETIC_DATA
  config.init.path = init_path or (pretrain_workdir(size) if synthetic else "")
  if total_steps is not None:
    config.total_steps = total_steps
  if synthetic:
    _fit_to_steps(config, config.total_steps)
    config.eval.max_batches = max(config.eval.max_batches, 128 // config.eval.batch_size)
  if eval_every is not None:
    config.eval.every = eval_every
  # Co-training data: the smoke variant's VLM manifest (any size: the path set on the command
  # line for full), or none.
  vlm_sources = tuple(dict(entry, weight=COTRAIN_WEIGHT) for entry in config.data.vlm_sources)
  config.data.vlm_sources = vlm_sources if switches["cotrain"] else ()
  config.model.knowledge_insulation = switches["knowledge_insulation"]
  config.loss.token_weight = 1.0 if switches["token_loss"] else 0.0
  config.lock()
  return config


def get_config(variant: str = "smoke") -> ml_collections.ConfigDict:
  """variant: "smoke", "medium" or "full", optionally ",<arm>" (default arm: ki_cotrain)."""
  size, _, arm = variant.partition(",")
  if size not in droid_ki.VARIANTS:
    raise ValueError(
      f"Unknown size {size!r} in variant {variant!r}; choose from {sorted(droid_ki.VARIANTS)}."
    )
  return arm_config(size, arm or "ki_cotrain")


def pretrain_config(
  size: str, steps: int, overrides: dict | None = None
) -> ml_collections.ConfigDict:
  """The VLM pretraining of a synthetic size (experiments/vlm_pretrain.py), fitted to `steps`,
  with the same `overrides` as the arms and no evaluation of its own: every arm evaluates the
  pretrained VLM at its step 0."""
  config = vlm_pretrain.get_config(size)
  config.unlock()
  config.update_from_flattened_dict(overrides or {})
  _fit_to_steps(config, steps)
  config.eval.every = 0
  config.lock()
  return config
