r"""The KI paper's ablation: joint training (FAST CE + flow) without the stop-gradient.

Same as experiments/droid_ki.py except model.knowledge_insulation=False: the expert's attention
reads the VLM's keys and values without stop_gradient, so the flow loss's gradient flows back
into SigLIP and the Gemma backbone. The clip stays droid_ki's (per optimizer group), so the
stop-gradient is the only difference: here the VLM's gradient, and so its clip, carries the flow
loss too.

  python -m ki.main --config=experiments/joint_no_stopgrad.py:full --workdir=/ckpt/joint_nosg \
    --config.data.arrayrecord_dir=... --config.assets.norm_stats=... \
    --config.assets.fast_tokenizer=... --config.assets.prompt_tokenizer=... \
    --config.init.path=/ckpt/openpi/pi05_base
  python -m ki.main --config=experiments/joint_no_stopgrad.py:smoke --workdir=/tmp/joint_nosg

What to expect (KI paper, Sec. 6): similar training losses, but the VLM drifts: the language
retention eval (eval/vlm/text_ce) rises and language following degrades compared with KI; the
flow loss's larger gradients reach the VLM (compare grad_norm/vlm with droid_ki).
"""

import ml_collections

from experiments import droid_ki


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = droid_ki.get_config(variant)
  config.unlock()
  config.model.knowledge_insulation = False
  config.lock()
  return config
