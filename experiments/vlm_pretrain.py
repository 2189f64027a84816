r"""The "pretrained VLM" stage of the KI ablation: the VLM alone learns the co-training set.

The KI paper starts from PaliGemma, a VLM that already answers questions about images; the
ablation (experiments/ki_ablation.py) asks whether robot training keeps or destroys that ability.
Our tiny models have no such checkpoint, so this stage makes one: the model trains only on the
VLM question/answer data (data.robot_weight=0), with the next-token loss only (flow_weight=0),
and the action expert group is frozen (it receives no gradient from the token loss anyway). The
saved checkpoint is a checkpoint of ours, loaded by the ablation arms with init.kind="ki".

Variants:
  smoke  the tiny model on the synthetic DROID cache (generated on first use into
         $KI_CACHE/smoke, $KI_CACHE defaulting to ~/.cache/ki); ~600 steps, ~3 minutes on a
         2-core CPU:
           python -m ki.main --config=experiments/vlm_pretrain.py:smoke \
             --workdir=$HOME/.cache/ki/smoke/vlm_pretrain
         Expect eval/vlm/text_ce to fall from ~7.7 (uniform over the vocabulary) towards ~0.7
         and eval/vlm/text_exact_match to rise well above chance (answers are single words).
  medium the ~90M-parameter model on the medium synthetic cache (3,600 scene questions), 3,000
         steps at batch 64 on one GPU:
           python -m ki.main --config=experiments/vlm_pretrain.py:medium \
             --workdir=$HOME/.cache/ki/medium/vlm_pretrain
  full   the same recipe at pi0.5 size, for completeness; at that size one starts from PaliGemma
         (experiments/droid_ki.py:full with init.kind=paligemma) instead:
           python -m ki.main --config=experiments/vlm_pretrain.py:full --workdir=/ckpt/vlm \
             --config.data.arrayrecord_dir=... --config.assets.norm_stats=... \
             --config.assets.fast_tokenizer=... --config.assets.prompt_tokenizer=...
         after setting data.vlm_sources (empty at full size) to the question/answer manifests.
"""

import ml_collections

from experiments import droid_ki

# Pretraining steps per synthetic variant.
STEPS = {"smoke": 600, "medium": 3_000}


def get_config(variant: str = "smoke") -> ml_collections.ConfigDict:
  config = droid_ki.get_config(variant)
  config.unlock()
  config.data.robot_weight = 0.0
  config.data.vlm_sources = tuple(dict(entry, weight=1.0) for entry in config.data.vlm_sources)
  config.loss.flow_weight = 0.0
  config.optimizer.groups.action_expert.frozen = True
  if variant in STEPS:
    config.total_steps = STEPS[variant]
    config.optimizer.groups.vlm.decay_steps = STEPS[variant]
    config.eval.every = STEPS[variant] // 3
    config.checkpoint.update(dict(every=STEPS[variant] // 3, max_to_keep=1))
  config.lock()
  return config
