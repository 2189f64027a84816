"""pi0.5 with Knowledge Insulation: one forward pass, two losses, and the two ways to sample.

Public surface (the trainer, the server and outside checks call these; keep them stable):
  Config, init_params, compute_losses, sample_actions, sample_fast, fake_observation,
  fake_actions, training_flops_per_example. The batch they take (Observation, Batch) is
  ki/batch.py's; pi0.5 has no dropout, so training and evaluation call the same compute_losses.

The parameter tree is openpi's pi0.5 layout (`PaliGemma/img`, `PaliGemma/llm`, `action_in_proj`,
`action_out_proj`, `time_mlp_in`, `time_mlp_out`), so openpi checkpoints load unchanged. Masks and
positions are explained in ki/model/masks.py, the joint attention in ki/model/gemma.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ki import batch as batch_lib
from ki.batch import Observation
from ki.model import flops as flops_lib
from ki.model import gemma, rtc, siglip
from ki.model import masks as masks_lib

PALIGEMMA_VOCAB_SIZE = 257_152
_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
  """Model configuration. Defaults are pi0.5 as openpi ships it (DROID: two cameras)."""

  vlm_variant: str = "gemma_2b"
  expert_variant: str = "gemma_300m"
  siglip_variant: str = "So400m/14"
  # Cameras the model encodes (from ki.batch.CAMERA_SLOTS), in prefix order. Slots not listed are
  # never encoded.
  image_keys: tuple[str, ...] = batch_lib.DROID_SLOTS
  image_size: int = 224
  action_dim: int = 32  # the model's (padded) action width
  data_action_dim: int = 8  # the real action dims; the flow loss ignores the padding
  action_horizon: int = 16
  max_token_len: int = 200
  # Text positions per example that get logits (FAST tokens + "|" + EOS, or a VQA answer).
  max_loss_tokens: int = 64
  vocab_size: int = PALIGEMMA_VOCAB_SIZE
  knowledge_insulation: bool = True  # stop-gradient where the expert reads the VLM
  # Whether the VLM computes the next-token loss (FAST postfix, co-training answers) and robot
  # prompts carry a FAST postfix. Training derives it from loss.token_weight > 0
  # (ki.train.setup.model_config); False is plain pi0.5 flow-only training.
  fast_loss: bool = True
  dtype: str = "bfloat16"
  remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name, or "none"
  # "einsum" (openpi's arithmetic) or "dot_product_attention" (jax.nn's fused kernels: cuDNN flash
  # attention on GPUs where it fits). Same function; see benchmarks/train_bench.py.
  attention_impl: str = "einsum"
  # LoRA adapters on each stream's attention and MLP (rank 0 = none; alpha / rank scales the
  # attention adapters). openpi's gemma_2b_lora and gemma_300m_lora: 16/16 and 32/32. Train them
  # with the "pi05_lora" group rules (ki.model.params), which freeze the language model's base.
  vlm_lora_rank: int = 0
  vlm_lora_alpha: float = 16.0
  expert_lora_rank: int = 0
  expert_lora_alpha: float = 32.0

  @property
  def loras(self) -> tuple[gemma.LoRA | None, gemma.LoRA | None]:
    """Per stream (VLM, expert): its adapters, or None."""
    return tuple(
      gemma.LoRA(rank, alpha) if rank > 0 else None
      for rank, alpha in (
        (self.vlm_lora_rank, self.vlm_lora_alpha),
        (self.expert_lora_rank, self.expert_lora_alpha),
      )
    )

  def __post_init__(self):
    # ConfigDicts hand over lists; the config must stay hashable (it is a static jit argument).
    object.__setattr__(self, "image_keys", tuple(self.image_keys))

  def validate(self) -> "Config":
    """Raises ValueError naming every inconsistency; returns self."""
    errors = []
    for field, table in (("vlm_variant", gemma.VARIANTS), ("expert_variant", gemma.VARIANTS)):
      if getattr(self, field) not in table:
        errors.append(f"{field}={getattr(self, field)!r} is not one of {sorted(table)}")
    try:
      vit = siglip.get_variant(self.siglip_variant)
      if self.image_size % vit.patch_size:
        errors.append(
          f"image_size {self.image_size} is not a multiple of the patch {vit.patch_size}"
        )
    except ValueError as e:
      errors.append(str(e))
    if not errors:
      vlm, expert = gemma.get_variant(self.vlm_variant), gemma.get_variant(self.expert_variant)
      for attr in ("depth", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(vlm, attr) != getattr(expert, attr):
          errors.append(
            f"the VLM and the expert share attention, so their {attr} must agree "
            f"({self.vlm_variant}: {getattr(vlm, attr)}, "
            f"{self.expert_variant}: {getattr(expert, attr)})"
          )
    if not self.image_keys:
      errors.append("image_keys is empty: the model needs at least one camera")
    unknown = [k for k in self.image_keys if k not in batch_lib.CAMERA_SLOTS]
    if unknown:
      errors.append(f"image_keys {unknown} are not camera slots {batch_lib.CAMERA_SLOTS}")
    if self.data_action_dim > self.action_dim:
      errors.append(
        f"data_action_dim {self.data_action_dim} > action_dim {self.action_dim}: "
        "raise model.action_dim (actions are zero-padded up to it)"
      )
    if self.data_action_dim < 1 or self.action_horizon < 1:
      errors.append("data_action_dim and action_horizon must be positive")
    if not 0 < self.max_loss_tokens < self.max_token_len:
      errors.append(f"max_loss_tokens {self.max_loss_tokens} must be in (0, max_token_len)")
    if self.dtype not in _DTYPES:
      errors.append(f"dtype {self.dtype!r} is not one of {_DTYPES}")
    if self.remat_policy != "none" and not hasattr(jax.checkpoint_policies, self.remat_policy):
      errors.append(f"remat_policy {self.remat_policy!r} is not in jax.checkpoint_policies")
    for stream in ("vlm", "expert"):
      rank, alpha = getattr(self, f"{stream}_lora_rank"), getattr(self, f"{stream}_lora_alpha")
      if rank < 0 or (rank > 0 and alpha <= 0):
        errors.append(f"{stream}_lora_rank must be >= 0 and its alpha > 0, got {rank}, {alpha}")
    if self.attention_impl not in gemma.ATTENTION_IMPLS:
      errors.append(f"attention_impl {self.attention_impl!r} is not one of {gemma.ATTENTION_IMPLS}")
    if errors:
      raise ValueError("Invalid model config:\n  " + "\n  ".join(errors))
    return self

  @property
  def num_image_tokens(self) -> int:
    return len(self.image_keys) * siglip.num_tokens(self.siglip_variant, self.image_size)


def posemb_sincos(time, width, min_period, max_period):
  """Sine-cosine embedding of scalars time [B] -> [B, width]."""
  fraction = jnp.linspace(0.0, 1.0, width // 2)
  period = min_period * (max_period / min_period) ** fraction
  angles = jnp.einsum(
    "i,j->ij", time, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST
  )
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _to_float_image(image):
  """uint8 [..., 3] (what the data and the server give) -> float32 in [-1, 1]; floats pass."""
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32) / 127.5 - 1.0
  return image


class PaliGemma(nn.Module):
  config: Config

  def setup(self):
    c = self.config
    self.img = siglip.SigLIP(
      variant=c.siglip_variant,
      out_width=gemma.get_variant(c.vlm_variant).width,
      dtype_mm=c.dtype,
      remat_policy=c.remat_policy,
    )
    self.llm = gemma.Gemma(
      vlm_variant=c.vlm_variant,
      expert_variant=c.expert_variant,
      vocab_size=c.vocab_size,
      dtype=c.dtype,
      knowledge_insulation=c.knowledge_insulation,
      remat_policy=c.remat_policy,
      attention_impl=c.attention_impl,
      loras=c.loras,
    )


class Pi05(nn.Module):
  """The pi0.5 network; its methods are the passes the functions below compose."""

  config: Config

  def setup(self):
    width = gemma.get_variant(self.config.expert_variant).width
    self.PaliGemma = PaliGemma(self.config)
    self.action_in_proj = nn.Dense(width)
    self.time_mlp_in = nn.Dense(width)
    self.time_mlp_out = nn.Dense(width)
    self.action_out_proj = nn.Dense(self.config.action_dim)

  def embed_prefix(self, obs: Observation):
    """-> tokens [B, Np, D], input mask bool [B, Np], ar mask int32 [B, Np]."""
    c = self.config
    missing = [k for k in c.image_keys if k not in obs.images or k not in obs.image_masks]
    if missing:
      raise ValueError(f"Observation lacks images {missing}; the model encodes {c.image_keys}.")
    # All cameras through SigLIP in one call: one larger matmul instead of one per camera. The
    # flattening is batch-major ([B, cameras] -> [B * cameras]), so a batch sharded over devices
    # stays sharded the same way and no device needs another's images.
    batch, num_cameras = obs.tokenized_prompt.shape[0], len(c.image_keys)
    images = jnp.stack([_to_float_image(obs.images[k]) for k in c.image_keys], axis=1)
    image_tokens = self.PaliGemma.img(images.reshape(batch * num_cameras, *images.shape[2:]))
    per_camera = image_tokens.shape[1]
    image_tokens = image_tokens.astype(c.dtype).reshape(batch, num_cameras * per_camera, -1)
    image_mask = jnp.repeat(
      jnp.stack([obs.image_masks[k] for k in c.image_keys], axis=1), per_camera, axis=1
    )
    text_tokens = self.PaliGemma.llm.embed(obs.tokenized_prompt)
    tokens = jnp.concatenate([image_tokens, text_tokens], axis=1)
    input_mask = jnp.concatenate([image_mask, obs.tokenized_prompt_mask.astype(bool)], axis=1)
    ar_mask = jnp.concatenate(
      [jnp.zeros(image_mask.shape, jnp.int32), obs.token_ar_mask.astype(jnp.int32)], axis=1
    )
    return tokens, input_mask, ar_mask

  def embed_suffix(self, x_t, time):
    """Noisy actions [B, H, A] and flow time [B] -> expert tokens [B, H, De], condition [B, De]."""
    action_tokens = self.action_in_proj(x_t)
    time_emb = posemb_sincos(time, action_tokens.shape[-1], min_period=4e-3, max_period=4.0)
    cond = nn.swish(self.time_mlp_out(nn.swish(self.time_mlp_in(time_emb))))
    return action_tokens, cond

  def train_forward(self, obs: Observation, x_t, time, loss_index):
    """The single training pass over prefix (with FAST postfix) and expert.

    Args:
      loss_index: int [B, K] prompt positions whose next token is a target.
    Returns:
      text logits float32 [B, K, V] at those positions, velocity float32 [B, H, A].
    """
    prefix_tokens, prefix_mask, prefix_ar = self.embed_prefix(obs)
    action_tokens, cond = self.embed_suffix(x_t, time)
    visible = masks_lib.visible_to_expert(prefix_mask, prefix_ar)
    horizon = x_t.shape[1]
    (prefix_out, expert_out), _ = self.PaliGemma.llm(
      (prefix_tokens, action_tokens),
      positions=(
        masks_lib.prefix_positions(prefix_mask),
        masks_lib.expert_positions(visible, horizon),
      ),
      masks=(
        masks_lib.make_attn_mask(prefix_mask, prefix_ar),
        masks_lib.expert_mask(visible, horizon),
      ),
      cond=cond,
    )
    text_out = prefix_out[:, self.config.num_image_tokens :]
    # Logits only where there is a target: never [B, prefix length, vocab].
    hidden = jnp.take_along_axis(text_out, loss_index[..., None], axis=1)
    return self.PaliGemma.llm.logits(hidden), self.action_out_proj(expert_out)

  def fill_cache(self, obs: Observation):
    """Prefix pass alone -> (hidden [B, Np, D], VLM kv cache, input mask [B, Np], ar mask)."""
    prefix_tokens, prefix_mask, prefix_ar = self.embed_prefix(obs)
    (prefix_out, _), kv = self.PaliGemma.llm(
      (prefix_tokens, None),
      positions=(masks_lib.prefix_positions(prefix_mask), None),
      masks=(masks_lib.make_attn_mask(prefix_mask, prefix_ar), None),
    )
    return prefix_out, kv, prefix_mask, prefix_ar

  def velocity(self, kv, visible, x_t, time):
    """Expert pass over a prefix cache: x_t [B, H, A], time [B] -> velocity [B, H, A]."""
    action_tokens, cond = self.embed_suffix(x_t, time)
    horizon = x_t.shape[1]
    (_, expert_out), _ = self.PaliGemma.llm(
      (None, action_tokens),
      positions=(None, masks_lib.expert_positions(visible, horizon)),
      masks=(None, masks_lib.expert_mask(visible, horizon)),
      cond=cond,
      context_kv=kv,
    )
    return self.action_out_proj(expert_out)

  def decode_step(self, token, position, mask, kv):
    """One autoregressive VLM step.

    token [B, 1] -> next-token logits [B, V], fresh kv [L, B, 1, K, H].
    """
    (out, _), fresh_kv = self.PaliGemma.llm(
      (self.PaliGemma.llm.embed(token), None),
      positions=(position, None),
      masks=(mask, None),
      context_kv=kv,
    )
    return self.PaliGemma.llm.logits(out)[:, -1], fresh_kv

  def hidden_logits(self, hidden):
    return self.PaliGemma.llm.logits(hidden)


def _apply(params, config, method, *args):
  return Pi05(config).apply({"params": params}, *args, method=method)


def init_params(config: Config, rng) -> dict:
  """Fresh parameters in openpi's layout. Use jax.eval_shape for shapes without memory."""
  config.validate()
  obs = fake_observation(config, 1)
  loss_index = jnp.zeros((1, config.max_loss_tokens), jnp.int32)
  variables = Pi05(config).init(
    rng, obs, fake_actions(config, 1), jnp.ones((1,)), loss_index, method=Pi05.train_forward
  )
  return dict(variables["params"])


def sample_time(rng, batch_size):
  """Flow time t ~ 0.999 * Beta(1.5, 1) + 0.001 (openpi; t = 1 is pure noise)."""
  return jax.random.beta(rng, 1.5, 1.0, (batch_size,)) * 0.999 + 0.001


def _loss_positions(obs: Observation, max_loss_tokens):
  """Prompt positions j whose next token j+1 carries loss.

  Returns (index [B, K], targets [B, K], valid, count).
  """
  loss_mask = obs.token_loss_mask[:, 1:].astype(bool)
  count = jnp.sum(loss_mask, axis=1)
  index = jax.vmap(lambda m: jnp.nonzero(m, size=max_loss_tokens, fill_value=0)[0])(loss_mask)
  targets = jnp.take_along_axis(obs.tokenized_prompt[:, 1:], index, axis=1)
  valid = jnp.arange(max_loss_tokens)[None, :] < count[:, None]
  return index.astype(jnp.int32), targets, valid, count


def compute_losses(
  params, config: Config, observation: Observation, actions, rng, *, noise=None, time=None
) -> dict:
  """One forward pass; per-example losses.

  Args:
    actions: float32 [B, H, action_dim], normalised, zero-padded past data_action_dim.
    rng: for the noise and time draws (may be None when both are given).
    noise, time: replace the random draws ([B, H, A] and [B]) when given.

  Returns:
    {"token_ce": [B] next-token cross-entropy over the loss-masked text — the FAST postfix of
     robot examples, the answer of co-training examples (0 where none or when config.fast_loss
     is off), "flow_mse": [B] flow-matching error over the horizon and the real action dims (0
     where has_actions is False), "token_accuracy": [B], "loss_tokens_truncated": [B]
     count of target tokens beyond max_loss_tokens (should stay 0)}.
  """
  batch = actions.shape[0]
  if noise is None or time is None:
    noise_rng, time_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, actions.shape) if noise is None else noise
    time = sample_time(time_rng, batch) if time is None else time
  t = time[:, None, None]
  x_t = t * noise + (1 - t) * actions
  target_velocity = noise - actions

  index, targets, valid, count = _loss_positions(observation, config.max_loss_tokens)
  logits, velocity = _apply(params, config, Pi05.train_forward, observation, x_t, time, index)

  dim_mask = (jnp.arange(config.action_dim) < config.data_action_dim).astype(jnp.float32)
  squared = jnp.square(velocity - target_velocity) * dim_mask
  flow_mse = jnp.sum(squared, axis=(1, 2)) / (config.action_horizon * config.data_action_dim)
  flow_mse = flow_mse * observation.has_actions.astype(jnp.float32)

  if config.fast_loss:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    denominator = jnp.maximum(jnp.sum(valid, axis=1), 1)
    token_ce = jnp.sum(nll * valid, axis=1) / denominator
    correct = (jnp.argmax(logits, axis=-1) == targets) & valid
    token_accuracy = jnp.sum(correct, axis=1) / denominator
  else:
    token_ce = token_accuracy = jnp.zeros((batch,), jnp.float32)
  return {
    "token_ce": token_ce,
    "flow_mse": flow_mse,
    "token_accuracy": token_accuracy,
    "loss_tokens_truncated": jnp.maximum(count - config.max_loss_tokens, 0),
  }


def text_logits(params, config: Config, observation: Observation):
  """The VLM alone, teacher-forced: next-token logits where the prompt has targets, no expert.

  Returns (logits float32 [B, K, V], targets int32 [B, K], valid bool [B, K]) with
  K = config.max_loss_tokens: for each loss-masked token (a VQA answer and its EOS, or a FAST
  postfix) in order, the logits that predict it. compute_losses' token loss is the masked mean
  of -log_softmax(logits)[targets]; evaluations that need the logits themselves (a restricted
  choice of answers, a softmax without some ids) start here.
  """
  hidden, _, _, _ = _apply(params, config, Pi05.fill_cache, observation)
  index, targets, valid, _ = _loss_positions(observation, config.max_loss_tokens)
  text = hidden[:, config.num_image_tokens :]
  selected = jnp.take_along_axis(text, index[..., None], axis=1)
  return _apply(params, config, Pi05.hidden_logits, selected), targets, valid


def encode_prefix(params, config: Config, observation: Observation):
  """The prefix (cameras + prompt; a FAST postfix, if any, is ignored) once through the VLM.

  Returns (hidden [B, T, D] VLM outputs, the per-layer KV cache, visible [B, T] bool: the cache
  slots that the expert and FAST decoding read). Both decoders start with it.
  """
  hidden, kv, prefix_mask, prefix_ar = _apply(params, config, Pi05.fill_cache, observation)
  return hidden, kv, masks_lib.visible_to_expert(prefix_mask, prefix_ar)


def sample_actions(
  params,
  config: Config,
  observation: Observation,
  rng,
  *,
  num_steps=10,
  noise=None,
  previous_chunk: rtc.PreviousChunk | None = None,
):
  """Flow decoding: prefix once into a KV cache, then `num_steps` Euler steps from t=1 to 0.

  A FAST postfix in the observation, if any, is ignored (the expert never reads it).
  With `previous_chunk` (real-time chunking, ki/model/rtc.py) each Euler step adds the paper's
  guidance toward the previous chunk (one extra VJP through the expert per step) and the first
  `previous_chunk.delay` rows of the result are the previous chunk's exactly. Without it the
  program is the plain one.
  Returns normalised actions [B, H, action_dim].
  """
  batch = observation.tokenized_prompt.shape[0]
  if noise is None:
    noise = jax.random.normal(rng, (batch, config.action_horizon, config.action_dim))
  _, kv, visible = encode_prefix(params, config, observation)
  dt = -1.0 / num_steps
  if previous_chunk is not None:
    return _sample_guided(params, config, kv, visible, noise, num_steps, previous_chunk)

  def euler_step(i, x_t):
    time = jnp.full((batch,), 1.0 + i * dt, jnp.float32)
    velocity = _apply(params, config, Pi05.velocity, kv, visible, x_t, time)
    return x_t + dt * velocity

  return jax.lax.fori_loop(0, num_steps, euler_step, noise.astype(jnp.float32))


def _sample_guided(params, config: Config, kv, visible, noise, num_steps, chunk: rtc.PreviousChunk):
  """sample_actions' Euler loop with RTC guidance (ki/model/rtc.py); same fixed trip count."""
  batch, horizon, action_dim = noise.shape
  if chunk.actions.shape != noise.shape:
    raise ValueError(
      f"previous_chunk.actions has shape {chunk.actions.shape}; the chunk is {noise.shape}"
    )
  # Only the real action dims carry a target; the padding past data_action_dim is left free.
  real_dims = (jnp.arange(action_dim) < config.data_action_dim).astype(jnp.float32)
  weights = rtc.prefix_weights(chunk.delay, chunk.prefix_length, horizon, chunk.schedule)
  weights = weights[:, :, None] * real_dims
  dt = -1.0 / num_steps

  def euler_step(i, x_t):
    time = jnp.full((batch,), 1.0 + i * dt, jnp.float32)
    velocity = rtc.guided_velocity(
      lambda x: _apply(params, config, Pi05.velocity, kv, visible, x, time),
      x_t,
      time,
      chunk.actions,
      weights,
      chunk.max_guidance_weight,
    )
    return x_t + dt * velocity

  actions = jax.lax.fori_loop(0, num_steps, euler_step, noise.astype(jnp.float32))
  return rtc.freeze_prefix(actions, chunk)


def sample_fast(params, config: Config, observation: Observation, *, max_tokens):
  """Greedy autoregressive decoding of FAST (or any text) tokens with a KV cache.

  The prompt is the prefix without any FAST postfix (a postfix in the observation is ignored).
  Returns int32 [B, max_tokens] language-model token ids; map them back with the tokenizer.
  """
  hidden, kv, visible = encode_prefix(params, config, observation)
  batch, prefix_len = visible.shape
  last = jnp.max(jnp.where(visible, jnp.arange(prefix_len)[None, :], -1), axis=1)
  first_logits = _apply(
    params, config, Pi05.hidden_logits, jnp.take_along_axis(hidden, last[:, None, None], axis=1)
  )[:, 0]
  start = jnp.sum(visible, axis=1, dtype=jnp.int32)

  # Fixed-size cache: prefix slots, then one slot per generated token.
  pad = [(0, 0), (0, 0), (0, max_tokens), (0, 0), (0, 0)]
  cache = tuple(jnp.pad(x, pad) for x in kv)
  cache_valid = jnp.concatenate([visible, jnp.zeros((batch, max_tokens), bool)], axis=1)
  tokens = jnp.zeros((batch, max_tokens), jnp.int32).at[:, 0].set(jnp.argmax(first_logits, -1))

  def step(i, carry):
    tokens, cache, cache_valid = carry
    mask = jnp.concatenate([cache_valid, jnp.ones((batch, 1), bool)], axis=1)[:, None, :]
    logits, fresh = _apply(
      params, config, Pi05.decode_step, tokens[:, i][:, None], (start + i)[:, None], mask, cache
    )
    cache = tuple(
      jax.lax.dynamic_update_slice_in_dim(c, f.astype(c.dtype), prefix_len + i, axis=2)
      for c, f in zip(cache, fresh)
    )
    cache_valid = cache_valid.at[:, prefix_len + i].set(True)
    tokens = tokens.at[:, i + 1].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return tokens, cache, cache_valid

  tokens, _, _ = jax.lax.fori_loop(0, max_tokens - 1, step, (tokens, cache, cache_valid))
  return tokens


def fake_observation(config: Config, batch_size: int, *, with_fast: bool = True) -> Observation:
  """A deterministic, well-formed observation: every camera, a prompt, optionally a FAST postfix.

  The prompt occupies half of max_token_len; the postfix (ar=1, loss on) follows it. The same
  observation without the postfix is what inference sees.
  """
  size = config.image_size
  grid = jnp.linspace(-1.0, 1.0, size)
  pattern = jnp.sin(3 * grid[:, None, None] + 5 * grid[None, :, None] + jnp.arange(3.0))
  images = {
    k: jnp.broadcast_to(jnp.roll(pattern, i, axis=0), (batch_size, size, size, 3))
    for i, k in enumerate(config.image_keys)
  }
  length = config.max_token_len
  prompt_len = length // 2
  postfix_len = min(config.max_loss_tokens, length // 4) if with_fast else 0
  positions = jnp.arange(length)
  text_ids = 2 + (positions * 7) % (config.vocab_size // 2)
  postfix_ids = config.vocab_size - 2 - (positions - prompt_len) % (config.vocab_size // 4)
  is_postfix = (positions >= prompt_len) & (positions < prompt_len + postfix_len)
  is_valid = positions < prompt_len + postfix_len
  tokens = jnp.where(is_postfix, postfix_ids, jnp.where(is_valid, text_ids, 0)).astype(jnp.int32)

  def rows(x):
    return jnp.broadcast_to(x, (batch_size, length))

  return Observation(
    images=images,
    image_masks={k: jnp.ones((batch_size,), bool) for k in config.image_keys},
    state=jnp.zeros((batch_size, config.action_dim), jnp.float32),
    tokenized_prompt=rows(tokens),
    tokenized_prompt_mask=rows(is_valid),
    token_ar_mask=rows(is_postfix.astype(jnp.int32)),
    token_loss_mask=rows(is_postfix),
    has_actions=jnp.ones((batch_size,), bool),
  )


def fake_actions(config: Config, batch_size: int):
  """A smooth normalised action chunk [B, H, action_dim], zero past data_action_dim."""
  steps = jnp.linspace(0.0, 1.0, config.action_horizon)[:, None]
  dims = jnp.arange(config.action_dim)[None, :]
  chunk = 0.5 * jnp.sin(2 * jnp.pi * steps + dims) * (dims < config.data_action_dim)
  return jnp.broadcast_to(chunk, (batch_size, config.action_horizon, config.action_dim))


training_flops_per_example = flops_lib.training_flops_per_example
