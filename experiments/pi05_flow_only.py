r"""The KI paper's baseline: pi0.5 trained with the flow-matching loss only (no FAST tokens).

Same model, data and optimizer as experiments/droid_ki.py; loss.token_weight=0, so only the flow
loss trains (the model computes no token logits); the tokenizer is built without FAST, so robot
prompts carry no FAST postfix (no FAST tokenizer asset is needed).
Without the cross-entropy the VLM receives gradient only through the expert's attention to it,
which is why knowledge_insulation is off here (with the stop-gradient on, the VLM would get no
gradient at all). Gradients are clipped over all parameters together, as openpi trains pi0.5
(optimizer.clip="global"): with one loss driving both groups there is no insulation for a
per-group clip to keep.

  python -m ki.main --config=experiments/pi05_flow_only.py:full --workdir=/ckpt/pi05_flow_only \
    --config.data.arrayrecord_dir=... --config.assets.norm_stats=... \
    --config.assets.prompt_tokenizer=... --config.init.path=/ckpt/openpi/pi05_base
  python -m ki.main --config=experiments/pi05_flow_only.py:smoke --workdir=/tmp/flow_only

What to expect (KI paper, Fig. 5/6): each step costs ~20% less than joint training, but the policy
needs several times more steps to reach the same performance; token_ce is logged as 0.
"""

import ml_collections

from experiments import droid_ki


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = droid_ki.get_config(variant)
  config.unlock()
  config.model.knowledge_insulation = False
  config.loss.token_weight = 0.0
  config.optimizer.clip = "global"
  config.lock()
  return config
