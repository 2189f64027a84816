"""A trained policy as a function: DROID observation -> action chunk in the robot's raw units.

`Policy.infer` applies exactly the inference-time half of the training pipeline (ki/data):
  images  resize_with_pad to the model's size, no augmentation (ki.data.images);
  state   joint_position (7) + gripper_position (1), quantile-normalised with the checkpoint's
          norm stats, discretised into the pi0.5 prompt by the checkpoint's tokenizer;
  actions sample_actions (prefix + KV cache + Euler steps), cut to the 8 real dims,
          unnormalised, then delta joints turned back into absolute ones with the current state.

Real-time chunking (RTC, ki/model/rtc.py; request keys in ki/serve/observation.py). The client
sends the chunk it is executing (raw units, as this server sent it), how many of its actions had
run when the observation was taken (s) and how many more will run before the reply arrives (d).
The server takes remaining = previous[s:] (P rows: the previous chunk's actions for this
observation's time steps onward), maps it into the model's space exactly as training maps a chunk
(joints made relative to *this* observation's state with the delta mask, then the action norm
stats), and samples the new chunk guided toward it over its first P positions (soft mask: 1 for
the first d, exponentially decaying after, 0 from P on). Its first d rows are then set to
remaining[:d] in raw units, bit for bit: those are the actions the robot executes anyway while the
reply is in flight, and the robot switches to the new chunk at row d.

`Policy.from_checkpoint` reads what the trainer wrote (layout in ki/checkpoint.py): the `params`
item (restored by orbax onto the local device, shapes and dtypes checked against the model config)
and the `assets` files (config.json, norm_stats.json, tokenizer.model).
"""

import json
import logging
import threading
import time
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from ki import checkpoint as checkpoint_lib
from ki.batch import Observation
from ki.data import droid, normalize
from ki.model import lora, pi05, rtc
from ki.serve import observation as observation_lib
from ki.tokenizers import prompt as prompt_lib

_REQUIRED_ASSETS = ("config.json", "norm_stats.json", "tokenizer.model")


def load_model_config(config_json: dict) -> pi05.Config:
  """pi05.Config of the params item, from the experiment config the trainer saved (config.model).
  A LoRA run's params item holds the adapters merged (ki/checkpoint.py): the model without them."""
  model = config_json.get("model")
  if not isinstance(model, dict):
    raise ValueError("the checkpoint's config.json has no 'model' section")
  try:
    return lora.without_lora(pi05.Config(**model).validate())
  except TypeError as error:  # an unknown field: the checkpoint is from another model version
    raise ValueError(f"the checkpoint's config.model does not fit pi05.Config: {error}") from error


def restore_params(step_dir: epath.Path, model_config: pi05.Config, device=None) -> dict:
  """The params item restored by orbax onto one device; orbax checks every shape against the tree
  the config implies."""
  device = device or jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  shapes = jax.eval_shape(lambda: pi05.init_params(model_config, jax.random.key(0)))
  target = {
    "params": jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes
    )
  }
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(step_dir / checkpoint_lib.PARAMS_ITEM, target)["params"]


class Policy:
  """sample_actions compiled once for one DROID request at a time.

  Thread-safe: the server calls `infer` from a worker thread; the request counter that varies the
  noise is guarded.
  """

  def __init__(
    self,
    params,
    model_config: pi05.Config,
    tokenizer: prompt_lib.Pi05Tokenizer,
    norm_stats: dict[str, normalize.NormStats],
    *,
    delta_action_mask: tuple[bool, ...] | None = droid.DEFAULT_DELTA_ACTION_MASK,
    num_flow_steps: int = 10,
    seed: int = 0,
    metadata: dict | None = None,
    rtc_max_guidance_weight: float = rtc.DEFAULT_MAX_GUIDANCE_WEIGHT,
    rtc_schedule: str = "exp",
  ):
    """
    Args:
      params: the model's parameter tree (openpi layout).
      model_config: its pi05.Config; data_action_dim must be DROID's 8.
      tokenizer: builds the prompt (no FAST tokenizer needed: inference has no postfix).
      norm_stats: {"state": NormStats, "actions": NormStats} over the 8 real dims, as training
        used them (actions' stats on delta actions when delta_action_mask is set).
      delta_action_mask: the training pipeline's mask (joints relative to the state); None or
        () when the model predicts absolute actions.
      num_flow_steps: Euler steps of sample_actions (pi0.5: 10).
      seed: base of the per-request noise (request k uses fold_in(seed, k)).
      metadata: sent to clients on connect (extended with the model's shapes).
      rtc_max_guidance_weight: beta of real-time chunking (the paper's 5); 0 keeps only the
        frozen first d actions.
      rtc_schedule: the soft mask over the guided overlap (rtc.SCHEDULES).
    """
    for key in ("state", "actions"):
      if key not in norm_stats:
        raise ValueError(f"norm stats lack {key!r} (they have {sorted(norm_stats)})")
    # The real dims: actions as the model was trained (DROID 8, LIBERO 7), the state as the norm
    # stats describe it (requests must send that many; DROID requests make 8).
    self.action_dims = model_config.data_action_dim
    self.state_dim = int(norm_stats["state"].q01.shape[-1])
    # Dims past the stats would pass through unnormalised: the model would see raw units.
    if norm_stats["actions"].q01.shape[-1] < self.action_dims:
      raise ValueError(
        f"norm stats 'actions' cover {norm_stats['actions'].q01.shape[-1]} dims, need "
        f"{self.action_dims}"
      )
    if self.state_dim > model_config.action_dim:
      raise ValueError(f"norm stats 'state' cover {self.state_dim} dims > model.action_dim")
    # DROID requests fit models of DROID's dims; anything else is served LIBERO-style.
    self.request_format = (
      "droid" if self.action_dims == self.state_dim == droid.ACTION_DIM else "libero"
    )
    unknown = [k for k in model_config.image_keys if k not in observation_lib.IMAGE_SLOTS]
    if unknown:
      raise ValueError(
        f"the model reads cameras {unknown} that a DROID request does not fill "
        f"(known: {sorted(observation_lib.IMAGE_SLOTS)})"
      )
    self.params = params
    self.model_config = model_config
    self.tokenizer = tokenizer
    self.norm_stats = norm_stats
    self.delta_action_mask = tuple(delta_action_mask) if delta_action_mask else None
    self.num_flow_steps = num_flow_steps
    rtc.check_schedule(rtc_schedule)  # at start, not at the first RTC request
    if not rtc_max_guidance_weight >= 0:
      raise ValueError(f"rtc_max_guidance_weight must be >= 0, got {rtc_max_guidance_weight}")
    self.rtc_max_guidance_weight = float(rtc_max_guidance_weight)
    self.rtc_schedule = rtc_schedule
    self._base_rng = jax.random.key(seed)
    self._count = 0
    self._lock = threading.Lock()
    self.metadata = dict(metadata or {})
    self.metadata.update(
      action_horizon=model_config.action_horizon,
      action_dim=self.action_dims,
      state_dim=self.state_dim,
      image_size=model_config.image_size,
      num_flow_steps=num_flow_steps,
      observation_keys=list(
        observation_lib.REQUIRED_KEYS
        if self.request_format == "droid"
        else observation_lib.libero_required_keys(model_config.image_keys)
      ),
      rtc={
        "keys": list(observation_lib.RTC_KEYS),
        "max_guidance_weight": self.rtc_max_guidance_weight,
        "schedule": rtc_schedule,
      },
    )

    def sample(params, observation: Observation, rng):
      return pi05.sample_actions(params, model_config, observation, rng, num_steps=num_flow_steps)

    def sample_rtc(params, observation: Observation, rng, previous: rtc.PreviousChunk):
      return pi05.sample_actions(
        params, model_config, observation, rng, num_steps=num_flow_steps, previous_chunk=previous
      )

    self._sample = jax.jit(sample)
    # Compiled on the first RTC request (or by warmup(rtc=True)); d and P are traced, so one
    # program serves every delay.
    self._sample_rtc = jax.jit(sample_rtc)

  @classmethod
  def from_checkpoint(
    cls,
    path: str,
    *,
    num_flow_steps: int = 10,
    seed: int = 0,
    rtc_max_guidance_weight: float = rtc.DEFAULT_MAX_GUIDANCE_WEIGHT,
    rtc_schedule: str = "exp",
  ) -> "Policy":
    """From a step folder, or a workdir or its checkpoints/ folder (the latest finished step)."""
    step_dir = checkpoint_lib.resolve_step_dir(path)
    if not (step_dir / checkpoint_lib.PARAMS_ITEM).is_dir():
      raise FileNotFoundError(f"checkpoint {step_dir} has no {checkpoint_lib.PARAMS_ITEM!r} item")
    assets = step_dir / checkpoint_lib.ASSETS_ITEM
    missing = [name for name in _REQUIRED_ASSETS if not (assets / name).exists()]
    if missing:
      raise FileNotFoundError(
        f"checkpoint {step_dir} lacks the assets {missing} in {assets}; "
        "train with config.assets set so the trainer stores them"
      )
    config_json = json.loads((assets / "config.json").read_text())
    model_config = load_model_config(config_json)
    data = config_json.get("data") or {}
    delta_action_mask = tuple(data.get("delta_action_mask", droid.DEFAULT_DELTA_ACTION_MASK))
    norm_stats = normalize.load_norm_stats(str(assets / "norm_stats.json"))
    tokenizer = prompt_lib.Pi05Tokenizer(
      prompt_lib.PromptTokenizer(str(assets / "tokenizer.model")),
      None,
      max_token_len=model_config.max_token_len,
      lm_vocab_size=model_config.vocab_size,
    )
    logging.info("Restoring params from %s.", step_dir)
    params = restore_params(step_dir, model_config)
    metadata = {
      "checkpoint": str(step_dir),
      "step": int(step_dir.name) if step_dir.name.isdigit() else -1,
    }
    return cls(
      params,
      model_config,
      tokenizer,
      norm_stats,
      delta_action_mask=delta_action_mask,
      num_flow_steps=num_flow_steps,
      seed=seed,
      metadata=metadata,
      rtc_max_guidance_weight=rtc_max_guidance_weight,
      rtc_schedule=rtc_schedule,
    )

  def _model_inputs(
    self, images: dict[str, np.ndarray], state: np.ndarray, prompt: str
  ) -> Observation:
    """Raw request parts -> an observation of one, as the data pipeline builds it."""
    config = self.model_config
    normalized_state = normalize.quantile_normalize(state, self.norm_stats["state"])
    tokens = self.tokenizer.tokenize_robot(prompt, normalized_state, None)
    if tokens is None:
      raise observation_lib.InvalidObservationError(
        f"{observation_lib.PROMPT} is too long: the prompt does not fit the model's "
        f"max_token_len={config.max_token_len} tokens"
      )
    padded_state = np.zeros((config.action_dim,), np.float32)
    padded_state[: len(normalized_state)] = normalized_state
    observation = Observation(
      images={
        k: observation_lib.resize_image(images[k], config.image_size) for k in config.image_keys
      },
      image_masks={k: np.ones((), bool) for k in config.image_keys},
      state=padded_state,
      tokenized_prompt=np.asarray(tokens["tokenized_prompt"], np.int32),
      tokenized_prompt_mask=np.asarray(tokens["tokenized_prompt_mask"], bool),
      token_ar_mask=np.asarray(tokens["token_ar_mask"], np.int32),
      token_loss_mask=np.asarray(tokens["token_loss_mask"], bool),
      has_actions=np.ones((), bool),
    )
    return jax.tree.map(lambda x: np.asarray(x)[None], observation)

  def _next_rng(self):
    with self._lock:
      self._count += 1
      return jax.random.fold_in(self._base_rng, self._count)

  def _previous_chunk(self, remaining: np.ndarray, delay: int, state: np.ndarray):
    """The previous chunk's remaining raw actions [P, A] -> rtc.PreviousChunk in model space:
    the same delta (relative to this observation's state) and normalisation as training."""
    config = self.model_config
    target = remaining
    if self.delta_action_mask:
      target = droid.to_delta_actions(target, state, self.delta_action_mask)
    target = normalize.quantile_normalize(target, self.norm_stats["actions"])
    padded = np.zeros((1, config.action_horizon, config.action_dim), np.float32)
    padded[0, : len(target), : self.action_dims] = target
    return rtc.previous_chunk(
      padded,
      delay,
      len(target),
      max_guidance_weight=self.rtc_max_guidance_weight,
      schedule=self.rtc_schedule,
    )

  def _parse(self, obs: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    images, state, prompt = observation_lib.parse_any(
      obs, state_dim=self.state_dim, slots=self.model_config.image_keys
    )
    if len(state) != self.state_dim:
      raise observation_lib.InvalidObservationError(
        f"this policy was trained on a {self.state_dim}-D state; a DROID request gives "
        f"{len(state)}-D (send {observation_lib.LIBERO_STATE} with {self.state_dim} values)"
      )
    return images, state, prompt

  def _raw_actions(self, normalized: np.ndarray, state: np.ndarray) -> np.ndarray:
    """The model's chunk [H, action_dim] -> the robot's raw units [H, A]."""
    actions = normalize.quantile_unnormalize(
      normalized[:, : self.action_dims], self.norm_stats["actions"]
    )
    if self.delta_action_mask:
      actions = droid.to_absolute_actions(actions, state, self.delta_action_mask)
    return actions.astype(np.float32)

  def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
    """One DROID request -> {"actions": float32 [H, 8] (absolute joints + gripper, raw units),
    "policy_timing": {"infer_ms": float}}. Raises InvalidObservationError for a bad request.

    With the RTC keys (module docstring) the chunk continues the previous one and its first d rows
    are the previous chunk's rtc/previous_actions[s : s + d] exactly."""
    start = time.monotonic()
    images, state, prompt = self._parse(obs)
    previous = observation_lib.parse_rtc(
      obs, horizon=self.model_config.action_horizon, action_dim=self.action_dims
    )
    observation = self._model_inputs(images, state, prompt)
    remaining, delay = previous if previous is not None else (None, 0)
    if remaining is None or len(remaining) == 0:  # nothing left of the previous chunk to continue
      normalized = self._sample(self.params, observation, self._next_rng())
    else:
      chunk = self._previous_chunk(remaining, delay, state)
      normalized = self._sample_rtc(self.params, observation, self._next_rng(), chunk)
    actions = self._raw_actions(np.asarray(normalized)[0], state)
    if delay:  # the model's rows are equal in its space; these are equal in the robot's units
      actions[:delay] = remaining[:delay]
    return {
      "actions": actions,
      "policy_timing": {"infer_ms": 1000 * (time.monotonic() - start)},
    }

  def infer_batch(
    self, observations: list[dict[str, Any]], *, batch_size: int | None = None
  ) -> list[dict[str, Any]]:
    """Several requests (without RTC keys) in one sample_actions call: what `infer` returns for
    each. `batch_size` pads the batch with copies of the first request, so one compiled program
    serves any number of requests up to it (simulators with finished episodes)."""
    start = time.monotonic()
    if not observations:
      return []
    if any(key in obs for obs in observations for key in observation_lib.RTC_KEYS):
      raise observation_lib.InvalidObservationError("infer_batch takes no RTC keys; use infer")
    parsed = [self._parse(obs) for obs in observations]
    inputs = [self._model_inputs(images, state, prompt) for images, state, prompt in parsed]
    count = max(len(inputs), batch_size or 0)
    inputs += [inputs[0]] * (count - len(inputs))
    batch = jax.tree.map(lambda *parts: np.concatenate(parts), *inputs)
    normalized = np.asarray(self._sample(self.params, batch, self._next_rng()))
    elapsed_ms = 1000 * (time.monotonic() - start)
    return [
      {
        "actions": self._raw_actions(normalized[i], state),
        "policy_timing": {"infer_ms": elapsed_ms, "batch_size": count},
      }
      for i, (_, state, _) in enumerate(parsed)
    ]

  def warmup(self, *, rtc_too: bool = False) -> float:
    """Compiles sample_actions with a fake request (and its RTC program when `rtc_too`); returns
    the seconds it took."""
    start = time.monotonic()
    if self.request_format == "droid":
      request = observation_lib.fake_droid_observation()
    else:
      request = observation_lib.fake_libero_observation(state_dim=self.state_dim)
    previous = self.infer(request)["actions"]
    if rtc_too:
      self.infer(
        {
          **request,
          observation_lib.RTC_PREVIOUS_ACTIONS: previous,
          observation_lib.RTC_EXECUTED_STEPS: 1,
          observation_lib.RTC_INFERENCE_DELAY: 1,
        }
      )
    return time.monotonic() - start
