r"""The KI ablation: a fair, falsifiable test of Knowledge Insulation at a scale we can run.

The KI paper (Driess et al. 2025) claims that with the stop-gradient and FAST co-training
  (1) the VLM keeps its knowledge and the policy follows language, where joint training without
      the stop-gradient degrades both;
  (2) the action expert trains as fast as pi0-FAST (FAST tokens only, autoregressive actions);
  (3) inference stays as fast as a flow-only model (pi0 / pi0.5), far faster than FAST decoding.
This experiment tests each on synthetic DROID scenes (ki/data/synthetic_scene.py):

  stage 1  a VLM that knows something visual: the VLM alone learns one-word answers to questions
           that need the image (colour of the object left/right of X, counts, shape of a named
           object, is there X, where is X; ki.data.synthetic_droid.QUESTION_TYPES), and the
           same model and budget with every image blanked is the blind baseline. The runner
           stops, saying so, unless the VLM beats the blind baseline by MIN_VQA_MARGIN in
           candidate-restricted accuracy: otherwise there is no visual knowledge to keep.
  stage 2  fine-tuning as practitioners do it: every arm starts from that VLM with a freshly
           initialised expert (seed -> expert init), the VLM's learning rate a tenth of
           pretraining's with a real warm-up. The arms (ARMS) differ ONLY in ARM_FIELDS
           (tests/experiments/test_ki_ablation.py checks it); the stress arms add a 10x expert
           learning rate with no warm-up, which the method predicts hurts joint training only.
           Every arm clips each optimizer group's gradient by its own norm, so under KI the
           VLM's update is the token loss's alone, exactly pi0-FAST's on the same batches; the
           ki_global_clip arm is KI with openpi's global clip, which couples the two groups.
  stage 3  measured at every evaluation (ki/ablation/probes.py): candidate-restricted VQA
           accuracy and answer loss with FAST ids excluded (beside the blind baseline), drift of
           the VLM's keys/values from the pretrained VLM, counterfactual language following
           (same scene and start, the instruction names another object), the flow gradient and
           the update reaching the VLM, the cosine of the flow and VQA gradients, the expert's
           adaRMS gate size, and held-out action error on >= 512 frames; then steps to 50% / 80%
           of the way to the best final error, area under the curve, paired bootstrap intervals
           across seeds (ki/ablation/report.py), and the decoders' latency.

Run on a 2-core CPU (about an hour; the result is in docs/ablation/):
  python -m ki.ablation --out=/tmp/ki_ablation
and the same experiment with the ~90M-parameter model on one GPU:
  python -m ki.ablation --size=medium --out=/tmp/ki_ablation_medium
Quick mode (what `make test` runs; minutes): python -m ki.ablation --out=/tmp/abl --quick

This file is plain configuration: the arms as data, each arm's config (`arm_config`,
`get_config`) and the pretraining's (`pretrain_config`); what ki.ablation reads from it is
listed in ki/ablation/runner.py. One arm alone, through the training entry point, after the
runner has pretrained the VLM ("smoke" or "medium", then ",<arm>"):
  python -m ki.main --config=experiments/ki_ablation.py:smoke,joint --workdir=/tmp/joint
"""

import os

import ml_collections

from experiments import droid_ki
from ki.model import sizes
from ki.train import config as config_lib

# Each arm's switches; everything else is shared.
#   knowledge_insulation: the stop-gradient where the expert reads the VLM's keys/values.
#   flow_weight / token_weight: loss = flow_weight * flow MSE + token_weight * next-token CE
#     (FAST tokens of robot examples, answers of co-training examples).
#   cotrain: VLM question/answer examples mixed in (COTRAIN_WEIGHT per robot example).
#   stress: the expert's learning rate x STRESS_EXPERT_LR_FACTOR, no warm-up in either group.
#   decoder: how the policy's actions are evaluated: "flow" (sample_actions) or "fast"
#     (sample_fast + FAST decoding, pi0-FAST).
#   clip: optimizer.clip, how gradients are clipped: "per_group" (each group by its own norm:
#     under KI the VLM's update is the token loss's alone, as pi0-FAST's) or "global" (openpi:
#     all parameters together, so the expert's flow gradient rescales the VLM's update).
ARMS = {
  "ki": dict(
    knowledge_insulation=True,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=False,
    stress=False,
    decoder="flow",
    clip="per_group",
    label="KI: stop-gradient, FAST + flow",
  ),
  "ki_cotrain": dict(
    knowledge_insulation=True,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=True,
    stress=False,
    decoder="flow",
    clip="per_group",
    label="KI + VLM co-training",
  ),
  "joint": dict(
    knowledge_insulation=False,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=False,
    stress=False,
    decoder="flow",
    clip="per_group",
    label="joint (no stop-gradient), alpha 1",
  ),
  "joint_cotrain": dict(
    knowledge_insulation=False,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=True,
    stress=False,
    decoder="flow",
    clip="per_group",
    label="joint, alpha 1, + co-training",
  ),
  "joint_a10": dict(
    knowledge_insulation=False,
    flow_weight=10.0,
    token_weight=1.0,
    cotrain=False,
    stress=False,
    decoder="flow",
    clip="per_group",
    label="joint, alpha 10 (pi0.5's weight)",
  ),
  "pi0_fast": dict(
    knowledge_insulation=True,
    flow_weight=0.0,
    token_weight=1.0,
    cotrain=False,
    stress=False,
    decoder="fast",
    clip="per_group",
    label="pi0-FAST: FAST tokens only, FAST-decoded",
  ),
  "flow_only": dict(
    knowledge_insulation=False,
    flow_weight=1.0,
    token_weight=0.0,
    cotrain=False,
    stress=False,
    decoder="flow",
    clip="per_group",
    label="flow-only pi0.5 (no FAST loss)",
  ),
  "ki_global_clip": dict(
    knowledge_insulation=True,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=False,
    stress=False,
    decoder="flow",
    clip="global",
    label="KI with openpi's global clip",
  ),
  "ki_stress": dict(
    knowledge_insulation=True,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=False,
    stress=True,
    decoder="flow",
    clip="per_group",
    label="KI, stress: 10x expert LR, no warm-up",
  ),
  "joint_stress": dict(
    knowledge_insulation=False,
    flow_weight=1.0,
    token_weight=1.0,
    cotrain=False,
    stress=True,
    decoder="flow",
    clip="per_group",
    label="joint, stress: 10x expert LR, no warm-up",
  ),
}
# The only config fields the arms may differ in.
ARM_FIELDS = (
  "model.knowledge_insulation",
  "loss.flow_weight",
  "loss.token_weight",
  "data.vlm_sources",
  "optimizer.groups.action_expert.peak_lr",
  "optimizer.groups.action_expert.end_lr",
  "optimizer.groups.action_expert.warmup_steps",
  "optimizer.groups.vlm.warmup_steps",
  "optimizer.clip",
)
# Paired comparisons the report makes (arm A minus arm B, per seed).
COMPARISONS = (
  ("ki", "joint"),
  ("ki_cotrain", "joint_cotrain"),
  ("ki", "joint_a10"),
  ("ki_stress", "joint_stress"),
  ("ki", "flow_only"),
  ("ki", "pi0_fast"),
  ("ki", "ki_cotrain"),
  ("ki", "ki_global_clip"),
)
QUICK_ARMS = ("ki", "joint", "pi0_fast")
MIN_VQA_MARGIN = 0.3  # pretrained minus blind candidate-restricted accuracy, or the runner stops
STRESS_EXPERT_LR_FACTOR = 10.0
PRETRAIN_MAX_TOKEN_LEN = 24  # the longest scene question + answer is 14 tokens
COTRAIN_WEIGHT = 0.2  # VLM examples per robot example in the co-training arms

# The sizes the runner trains: model (a ki.model.sizes name), synthetic data, budget, schedules.
# The VLM fine-tunes at a tenth of its pretraining rate; the fresh expert at expert_lr.
SIZES = {
  "smoke": dict(
    model="ablation",
    data_variant="smoke",  # droid_ki's run settings (workers, logging) for this size
    episodes=112,
    eval_shards=3,
    vlm_images=2_400,
    batch_size=8,
    eval_batch_size=64,
    steps=200,
    eval_every=50,
    warmup_steps=20,
    pretrain_steps=1_200,
    pretrain_batch_size=16,
    pretrain_lr=3e-3,
    expert_lr=1e-3,
  ),
  "medium": dict(
    model="medium",
    data_variant="medium",
    episodes=480,
    eval_shards=4,
    vlm_images=12_000,
    batch_size=64,
    eval_batch_size=64,
    steps=3_000,
    eval_every=150,
    warmup_steps=300,
    pretrain_steps=6_000,
    pretrain_batch_size=64,
    pretrain_lr=3e-4,
    expert_lr=3e-4,
  ),
}
# Held-out sets per size (ki/ablation/probes.py): robot frames for the action error, VQA
# questions, counterfactual instruction pairs.
PROBES = {
  "smoke": dict(robot_frames=512, questions=192, pairs=48),
  "medium": dict(robot_frames=1024, questions=720, pairs=128),
}
# --quick (the test): a small synthetic dataset of its own and small held-out sets.
QUICK_DATA = {
  "synthetic_data.episodes": 24,
  "synthetic_data.vlm_images": 40,
  "synthetic_data.eval_shards": 1,
}
QUICK_PROBES = dict(robot_frames=16, questions=8, pairs=4)
SIZE_DEFAULTS = {
  size: dict(steps=s["steps"], eval_every=s["eval_every"]) for size, s in SIZES.items()
}
PRETRAIN_STEPS = {size: s["pretrain_steps"] for size, s in SIZES.items()}


def cache_dir(size: str) -> str:
  """Where a size keeps its data and pretrained VLMs: $KI_CACHE/ki_ablation_<size>."""
  return droid_ki.cache_dir(f"ki_ablation_{size}")


def pretrain_workdir(size: str, *, blind: bool = False) -> str:
  """The pretrained VLM's workdir (every arm starts from it), or the blind baseline's."""
  return os.path.join(cache_dir(size), "vlm_pretrain_blind" if blind else "vlm_pretrain")


def blind_manifest(manifest: str) -> str:
  """The blind twin of a VQA manifest (same questions, every image blank; the runner writes it)."""
  root, ext = os.path.splitext(manifest)
  return f"{root}_blind{ext}"


def _group(peak_lr: float, warmup_steps: int, steps: int) -> dict:
  """One optimizer group: warm-up, then a cosine to a tenth of the peak at the last step."""
  return dict(
    config_lib.OPENPI_GROUP,
    peak_lr=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=steps,
    end_lr=peak_lr / 10,
    weight_decay=1e-4,
  )


def base_config(size: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """What pretraining and every arm of `size` share: model, synthetic data, batch, eval."""
  if size not in SIZES:
    raise ValueError(f"Unknown ablation size {size!r}; choose from {sorted(SIZES)}.")
  s = SIZES[size]
  cache = cache_dir(size)
  config = droid_ki.base_config()
  droid_ki.synthetic_run(config, s["data_variant"], cache, **sizes.SIZES[s["model"]])
  config.synthetic_data.update(
    dict(
      dir=cache, episodes=s["episodes"], vlm_images=s["vlm_images"], eval_shards=s["eval_shards"]
    )
  )
  config.data.arrayrecord_dir = os.path.join(cache, "arrayrecord", "train")
  config.data.eval_arrayrecord_dir = os.path.join(cache, "arrayrecord", "eval")
  config.batch_size = s["batch_size"]
  config.eval.batch_size = s["eval_batch_size"]
  config.eval.max_batches = 0  # every held-out frame
  config.update_from_flattened_dict(overrides or {})
  return config


def _fit_to_steps(config: ml_collections.ConfigDict, steps: int) -> None:
  """A short run: one checkpoint, at the end."""
  config.total_steps = steps
  config.checkpoint.update(dict(every=steps, max_to_keep=1))


def arm_config(
  size: str,
  arm: str,
  *,
  init_path: str = "",
  seed: int = 0,
  total_steps: int | None = None,
  eval_every: int | None = None,
  cotrain_weight: float = COTRAIN_WEIGHT,
  overrides: dict | None = None,
) -> ml_collections.ConfigDict:
  """The config of one arm; `overrides` ({"a.b": value}) apply to every arm alike."""
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; choose from {sorted(ARMS)}.")
  switches, s = ARMS[arm], SIZES[size]
  config = base_config(size, overrides)
  config.seed = seed
  config.init.update(dict(kind="ki", path=init_path or pretrain_workdir(size), fresh_expert=True))
  steps = total_steps or s["steps"]
  _fit_to_steps(config, steps)
  config.eval.every = eval_every or s["eval_every"]
  warmup = 0 if switches["stress"] else min(s["warmup_steps"], max(steps // 10, 1))
  expert_lr = s["expert_lr"] * (STRESS_EXPERT_LR_FACTOR if switches["stress"] else 1.0)
  config.optimizer.groups = dict(
    vlm=_group(s["pretrain_lr"] / 10, warmup, steps), action_expert=_group(expert_lr, warmup, steps)
  )
  vlm_sources = tuple(dict(entry, weight=cotrain_weight) for entry in config.data.vlm_sources)
  config.data.vlm_sources = vlm_sources if switches["cotrain"] else ()
  config.model.knowledge_insulation = switches["knowledge_insulation"]
  config.loss.flow_weight = switches["flow_weight"]
  config.loss.token_weight = switches["token_weight"]
  config.optimizer.clip = switches["clip"]
  # Overrides win over everything above (the schedules included), for every arm alike.
  config.update_from_flattened_dict(overrides or {})
  config.lock()
  return config


def full_arm_config(arm: str) -> ml_collections.ConfigDict:
  """An arm at pi0.5's size, config only (the runner does not train it): the VLM from a
  PaliGemma checkpoint and a fresh expert, as in the KI paper; openpi's fine-tuning schedule for
  both groups (stress: the expert's rate x STRESS_EXPERT_LR_FACTOR, no warm-up). Set
  --config.init.path, the data paths and, for the co-training arms, data.vlm_sources."""
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; choose from {sorted(ARMS)}.")
  switches = ARMS[arm]
  config = droid_ki.get_config("full")
  config.unlock()
  config.init.kind = "paligemma"
  if switches["stress"]:
    config.optimizer.groups.action_expert.peak_lr *= STRESS_EXPERT_LR_FACTOR
    config.optimizer.groups.action_expert.end_lr *= STRESS_EXPERT_LR_FACTOR
    for group in config.optimizer.groups.values():
      group.warmup_steps = 0
  config.model.knowledge_insulation = switches["knowledge_insulation"]
  config.loss.flow_weight = switches["flow_weight"]
  config.loss.token_weight = switches["token_weight"]
  config.optimizer.clip = switches["clip"]
  config.lock()
  return config


def get_config(variant: str = "smoke") -> ml_collections.ConfigDict:
  """variant: "smoke", "medium" or "full", optionally ",<arm>" (default arm: ki)."""
  size, _, arm = variant.partition(",")
  if size == "full":
    return full_arm_config(arm or "ki")
  if size not in SIZES:
    raise ValueError(
      f"Unknown size {size!r} in variant {variant!r}; choose from {sorted(SIZES) + ['full']}."
    )
  return arm_config(size, arm or "ki")


def pretrain_config(
  size: str, steps: int | None = None, overrides: dict | None = None, *, blind: bool = False
) -> ml_collections.ConfigDict:
  """Stage 1: the VLM alone on the scene questions (robot weight 0, no flow loss, the expert
  frozen), at the pretraining learning rate; `blind` reads the blank-image twins of the
  manifests. No evaluation of its own: the runner scores it (ki/ablation/probes.py)."""
  s = SIZES[size]
  config = base_config(size, overrides)
  steps = steps or s["pretrain_steps"]
  _fit_to_steps(config, steps)
  config.batch_size = s["pretrain_batch_size"]
  config.data.robot_weight = 0.0
  manifests = [entry["path"] for entry in config.data.vlm_sources]
  if blind:
    manifests = [blind_manifest(path) for path in manifests]
  config.data.vlm_sources = tuple(
    dict(entry, path=path, weight=1.0) for entry, path in zip(config.data.vlm_sources, manifests)
  )
  config.loss.flow_weight = 0.0
  config.eval.every = 0
  # Questions and answers are short: a shorter prompt (no learned positions: same parameters).
  config.model.max_token_len = PRETRAIN_MAX_TOKEN_LEN
  config.model.max_loss_tokens = 4
  config.optimizer.groups = dict(
    vlm=_group(s["pretrain_lr"], max(steps // 20, 1), steps),
    action_expert=dict(_group(s["pretrain_lr"], 0, steps), frozen=True),
  )
  # Overrides win over everything above, as in the arms (e.g. --override=batch_size=32 sets the
  # pretraining's batch too; optimizer.groups.vlm.peak_lr its learning rate).
  config.update_from_flattened_dict(overrides or {})
  config.lock()
  return config
