r"""The KI paper's ablation: a frozen VLM; only the action expert trains (flow loss only).

The VLM optimizer group is frozen (zero updates, no optimizer state), so only the expert, the
action projections and the time MLP learn; the FAST loss is off because it could only train the
frozen VLM.

  python -m ki.main --config=experiments/vlm_frozen.py:full --workdir=/ckpt/vlm_frozen \
    --config.data.arrayrecord_dir=... --config.assets.norm_stats=... \
    --config.assets.prompt_tokenizer=... --config.init.path=/ckpt/openpi/pi05_base
  python -m ki.main --config=experiments/vlm_frozen.py:smoke --workdir=/tmp/vlm_frozen

What to expect (KI paper, Sec. 6): training is cheaper (no VLM gradients or Adam moments) and the
language is preserved exactly, but the policy performs poorly: the VLM's representations are not
adapted to robot control. update_norm/vlm stays 0.
"""

import ml_collections

from experiments import droid_ki


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = droid_ki.get_config(variant)
  config.unlock()
  config.optimizer.groups.vlm.frozen = True
  config.loss.token_weight = 0.0
  config.lock()
  return config
