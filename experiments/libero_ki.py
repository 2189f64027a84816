r"""pi0.5 with Knowledge Insulation on LIBERO (a LeRobot dataset): openpi's pi05_libero + KI.

The KI paper reports 98.0 / 97.8 / 95.6 / 85.8 / 96.0 on LIBERO Spatial / Object / Goal / 10 / 90.

Variants:
  full   pi0.5 sizes on LIBERO as published for openpi (a LeRobot dataset: cameras `image` and
         `wrist_image` at 256x256, resized with padding to 224; 8-D `state`; 7-D `actions`, already
         end-effector deltas, so no delta mask), openpi's pi05_libero settings as the starting
         point: horizon 10, actions padded to 32, batch 256, AdamW b=(0.9, 0.95) with clipping
         to norm 1.0, warm-up then cosine at peak 5e-5, EMA 0.999, 30k steps, initialised from
         openpi's pi05_base; plus KI (FAST token loss + flow loss, stop-gradient). The offline
         jobs first (the same keys and horizon as below):
           python -m data_prep.lerobot_norm_stats --dataset=/data/libero \
             --out=/data/libero_assets/norm_stats.json --action_horizon=10
           python -m data_prep.lerobot_fit_fast --dataset=/data/libero \
             --norm_stats=/data/libero_assets/norm_stats.json \
             --out_dir=/data/libero_assets/fast --action_horizon=10
           python -m ki.main --config=experiments/libero_ki.py:full --workdir=/ckpt/ki_libero \
             --config.data.lerobot_dir=/data/libero \
             --config.assets.norm_stats=/data/libero_assets/norm_stats.json \
             --config.assets.fast_tokenizer=/data/libero_assets/fast \
             --config.assets.prompt_tokenizer=/data/paligemma_tokenizer.model \
             --config.init.path=/ckpt/openpi/pi05_base
         Serve it with `python -m ki.serve` and openpi's LIBERO client: requests carry
         observation/image, observation/wrist_image, observation/state and prompt; replies are
         7-D actions [10, 7].
         Differences from openpi's pi05_libero: ki always puts the discretised state in the
         prompt (pi0.5's format; openpi's pi05_libero sets discrete_state_input=False), the
         clip is per optimizer group (openpi's is global over all parameters: one value away,
         --config.optimizer.clip=global; per group, the VLM's update under KI is the token
         loss's alone), and the warm-up/decay lengths below are openpi's as we read its config,
         not re-checked here.
  medium the ~90M model with pi0.5's proportions on a larger synthetic LIBERO-spec dataset (one
         GPU): python -m ki.main --config=experiments/libero_ki.py:medium --workdir=/tmp/libero_m
  smoke  a tiny model on a synthetic LIBERO-spec LeRobot dataset (v3.0, tabletop scenes, real
         parquet + mp4) generated on first use into $KI_CACHE/libero_smoke (default
         ~/.cache/ki): both losses fall within a few hundred steps on a 2-core CPU:
           python -m ki.main --config=experiments/libero_ki.py:smoke --workdir=/tmp/ki_libero

Every field is plain data; override any with --config.a.b=value. The robot spec is
config.data.robot (ki/data/robot_spec.py): change it for another robot's LeRobot dataset.
"""

import os

import ml_collections

from experiments import droid_ki
from ki import batch as batch_lib
from ki.train import config as config_lib

ACTION_HORIZON = 10
STATE_DIMS, ACTION_DIMS = 8, 7
SYNTHETIC_DATA = {
  "smoke": dict(episodes=48, vlm_images=120),
  "medium": dict(episodes=480, vlm_images=1200),
}
EVAL_EPISODES = {"smoke": 4, "medium": 20}


def _robot_spec() -> ml_collections.ConfigDict:
  """LIBERO's keys as published for openpi; the prompt is the frame's task string."""
  return ml_collections.ConfigDict(
    dict(
      cameras=(("image", batch_lib.BASE_SLOT), ("wrist_image", batch_lib.LEFT_WRIST_SLOT)),
      state_key="state",
      action_key="actions",
      prompt="task",
    )
  )


def _libero_data(config: ml_collections.ConfigDict) -> None:
  config.data.source = "lerobot"
  config.data.robot = _robot_spec()
  # LIBERO's actions are already deltas (openpi's pi05_libero: extra_delta_transform=False).
  config.data.delta_action_mask = ()
  config.model.action_horizon = ACTION_HORIZON
  config.model.data_action_dim = ACTION_DIMS


def base_config() -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  _libero_data(config)
  config.init.kind = "openpi"
  config.total_steps = 30_000
  config.batch_size = 256
  config.optimizer.ema_decay = 0.999
  config.optimizer.clip = "per_group"  # KI's VLM: the token loss's update alone (see droid_ki)
  group = dict(config_lib.OPENPI_GROUP, warmup_steps=10_000, decay_steps=1_000_000)
  config.optimizer.groups = dict(vlm=dict(group), action_expert=dict(group))
  config.data.num_workers = 8
  config.checkpoint.update(dict(every=1_000, max_to_keep=3, keep_period=5_000))
  return config


def _synthetic_config(variant: str) -> ml_collections.ConfigDict:
  config = base_config()
  cache = droid_ki.cache_dir(f"libero_{variant}")
  droid_ki.synthetic_run(
    config, variant, cache, action_horizon=ACTION_HORIZON, data_action_dim=ACTION_DIMS
  )
  config.optimizer.ema_decay = None
  config.synthetic_data.update(dict(dir=cache, **SYNTHETIC_DATA[variant]))
  config.data.lerobot_dir = os.path.join(cache, "lerobot")
  config.data.lerobot_eval_episodes = EVAL_EPISODES[variant]
  return config


VARIANTS = {
  "full": base_config,
  "medium": lambda: _synthetic_config("medium"),
  "smoke": lambda: _synthetic_config("smoke"),
}


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of libero_ki; choose from {sorted(VARIANTS)}.")
  config = VARIANTS[variant]()
  config.lock()
  return config
