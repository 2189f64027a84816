r"""pi0.5 with Knowledge Insulation on Meta-World expert demonstrations (a LeRobot v3.0 dataset).

First the demonstrations and their assets (norm stats, FAST, SentencePiece: into <out>_assets):
  python -m data_prep.metaworld_demos --suite=mt10 --episodes_per_task=50 \
    --out=~/.cache/ki/metaworld_mt10
The variants read that folder (or $KI_METAWORLD when set). Then train and evaluate in closed loop:
  python -m ki.main --config=experiments/metaworld_ki.py:cpu --workdir=/tmp/mw_cpu
  python -m ki.eval.metaworld --checkpoint=/tmp/mw_cpu --suite=mt10 --episodes_per_task=50

Variants:
  cpu              what the 2-core CPU trains in about an hour: the "metaworld_cpu" model size
                   (128-wide VLM, 64-wide expert, SigLIP mu/16 on one 128 px camera), camera +
                   4-D robot state (LeRobot's observation.state), from scratch, batch 16, 4k steps.
  cpu_env_state    the same with the 39-D environment state (object and goal positions) as the
                   state: the robot-spec variant, where the camera matters less.
  medium           the ~90M model (pi0.5's proportions) for one GPU, camera + 4-D state:
                     python -m ki.main --config=experiments/metaworld_ki.py:medium \
                       --workdir=/ckpt/mw_medium
  full             pi0.5 from openpi's base checkpoint with the paper's settings (PaliGemma's
                   tokenizer; norm stats and FAST from the demos job):
                     python -m ki.main --config=experiments/metaworld_ki.py:full \
                       --workdir=/ckpt/mw_full --config.init.path=/ckpt/openpi/pi05_base \
                       --config.assets.prompt_tokenizer=/data/paligemma_tokenizer.model
  smoke            a few steps of the tiny model (tests): the same data path.
The held-out split is the dataset's last `lerobot_eval_episodes` episodes (open-loop eval);
closed-loop success is measured by ki.eval.metaworld (and during training with
--config.eval.sim.every=N).

Every field is plain data; override any with --config.a.b=value.
"""

import os

import ml_collections

from experiments import droid_ki
from ki import batch as batch_lib
from ki.model import sizes
from ki.sim import metaworld_demos
from ki.train import config as config_lib


def dataset_dir() -> str:
  """Where the demos job wrote the dataset: $KI_METAWORLD, else $KI_CACHE/metaworld_mt10."""
  return os.environ.get("KI_METAWORLD") or droid_ki.cache_dir("metaworld_mt10")


def _robot_spec(state: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      cameras=((metaworld_demos.IMAGE_KEY, batch_lib.BASE_SLOT),),
      state_key=metaworld_demos.STATE_KEYS[state],
      action_key=metaworld_demos.ACTION_KEY,
      prompt="task",
    )
  )


def _metaworld_data(config: ml_collections.ConfigDict, state: str) -> None:
  data = dataset_dir()
  assets = metaworld_demos.assets_dir(data)
  config.data.source = "lerobot"
  config.data.lerobot_dir = data
  config.data.lerobot_eval_episodes = 10
  config.data.robot = _robot_spec(state)
  config.data.delta_action_mask = ()  # Meta-World's actions are already hand deltas.
  # A fixed camera in simulation: pi0.5's crop/rotate augmentation would move the goal markers.
  config.data.augment = False
  config.assets.norm_stats = os.path.join(assets, f"norm_stats_{state}.json")
  config.assets.fast_tokenizer = os.path.join(assets, "fast_tokenizer")
  config.assets.prompt_tokenizer = os.path.join(assets, "tokenizer.model")
  config.eval.vlm_heldout = ""


def _groups(**settings) -> dict:
  group = dict(config_lib.OPENPI_GROUP, **settings)
  return dict(vlm=dict(group), action_expert=dict(group))


def _small_run(size: str, state: str, **model) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  _metaworld_data(config, state)
  config.mesh = (("data", -1), ("fsdp", 1))
  config.fsdp_min_size_bytes = 2**20
  config.init.kind = "scratch"
  config.model = ml_collections.ConfigDict(sizes.fields(size, **model))
  return config


def _cpu(state: str) -> ml_collections.ConfigDict:
  # 39 state bins take ~4 tokens each in the prompt (digits are split): a longer prompt.
  max_token_len = 80 if state == "state" else 224
  model = dict(max_token_len=max_token_len)
  if state == "environment_state":
    # The state is padded to the model's action width (openpi's 32): 39 dims need 40.
    model["action_dim"] = 40
  config = _small_run("metaworld_cpu", state, **model)
  config.compilation_cache_dir = droid_ki.cache_dir("jax_cache")
  config.total_steps = 4_000
  # Batch 16: on two cores more updates beat bigger batches for a model learning from scratch.
  config.batch_size = 16
  config.data.num_workers = 1
  config.data.read_threads = 1
  # Every 500 steps, all kept: the learning curve of closed-loop success is measured on them.
  config.checkpoint.update(dict(every=500, max_to_keep=10, keep_period=0))
  config.log_every = 100
  config.eval.update(dict(every=1_000, batch_size=16, max_batches=8))
  config.optimizer.groups = _groups(
    peak_lr=1e-3, warmup_steps=200, decay_steps=4_000, end_lr=5e-5, weight_decay=1e-4
  )
  return config


def _medium() -> ml_collections.ConfigDict:
  config = _small_run("medium", "state", action_horizon=16, data_action_dim=4, image_size=128)
  config.model.image_keys = (batch_lib.BASE_SLOT,)
  config.total_steps = 30_000
  config.batch_size = 64
  config.data.num_workers = 8
  config.checkpoint.update(dict(every=2_000, max_to_keep=15, keep_period=0))
  config.log_every = 100
  config.eval.update(dict(every=2_000, batch_size=64, max_batches=4))
  config.optimizer.groups = _groups(
    peak_lr=3e-4, warmup_steps=1_000, decay_steps=30_000, end_lr=3e-5, weight_decay=1e-4
  )
  return config


def _full() -> ml_collections.ConfigDict:
  """pi0.5 from openpi's base: openpi's LIBERO-style fine-tune, one camera, 4-D actions."""
  config = config_lib.default_config()
  _metaworld_data(config, "state")
  config.init.kind = "openpi"
  config.model.image_keys = (batch_lib.BASE_SLOT,)
  config.model.action_horizon = metaworld_demos.ACTION_HORIZON
  config.model.data_action_dim = 4
  config.total_steps = 30_000
  config.batch_size = 256
  config.optimizer.ema_decay = 0.999
  config.optimizer.groups = _groups(warmup_steps=1_000, decay_steps=30_000, end_lr=5e-6)
  config.data.num_workers = 8
  config.assets.prompt_tokenizer = ""  # PaliGemma's: --config.assets.prompt_tokenizer=...
  config.checkpoint.update(dict(every=1_000, max_to_keep=3, keep_period=5_000))
  return config


def _smoke() -> ml_collections.ConfigDict:
  config = _small_run(
    "tiny", "state", action_horizon=16, data_action_dim=4, max_token_len=80, max_loss_tokens=40
  )
  config.model.image_keys = (batch_lib.BASE_SLOT,)
  config.total_steps = 4
  config.batch_size = 4
  config.data.num_workers = 0
  config.data.read_threads = 1
  config.data.lerobot_eval_episodes = 1
  config.checkpoint.update(dict(every=4, max_to_keep=1, keep_period=0))
  config.log_every = 2
  config.eval.update(dict(every=4, batch_size=4, max_batches=1))
  config.optimizer.groups = _groups(peak_lr=1e-3, warmup_steps=1, decay_steps=4, end_lr=1e-4)
  return config


VARIANTS = {
  "smoke": _smoke,
  "cpu": lambda: _cpu("state"),
  "cpu_env_state": lambda: _cpu("environment_state"),
  "medium": _medium,
  "full": _full,
}


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(
      f"Unknown variant {variant!r} of metaworld_ki; choose from {sorted(VARIANTS)}."
    )
  config = VARIANTS[variant]()
  config.optimizer.clip = "per_group"  # KI's VLM: the token loss's update alone (see droid_ki)
  config.lock()
  return config
