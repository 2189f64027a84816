r"""Real-time chunking (RTC): the next action chunk inpainted onto the one the robot is executing.

Black, Galliker & Levine 2025, "Real-Time Execution of Action Chunking Flow Policies"
(arXiv 2506.07339), Algorithm 1, in ki's time convention. While the next chunk is computed the
robot keeps executing the current one, so a chunk generated independently rarely agrees with what
the robot is doing when it arrives. RTC generates it *conditioned on the previous chunk*, with no
retraining, by guided inpainting inside the flow integration:

  position i of the new chunk   0 ........ d-1 | d ........ P-1 | P ........ H-1
  target Y_i                    previous chunk's actions for the same time steps | none
  soft mask W_i                 1 (frozen)     | decaying to 0   | 0 (free)

d is the inference delay in control steps (those actions execute before the new chunk arrives:
they are the previous chunk's, whatever the model says), P the number of positions the previous
chunk still covers (H - s, s the steps executed since the previous chunk's observation).
`sample_actions(..., previous_chunk=PreviousChunk(...))` runs it (ki/model/pi05.py).

Time convention. ki integrates x_t = t * noise + (1 - t) * actions from t = 1 (noise) to t = 0
(data) with x <- x + dt * v, dt = -1/N, where the model's velocity v estimates noise - actions.
The clean-chunk estimate is therefore  x_hat(x_t) = x_t - t * v(x_t, t).
The paper integrates tau = 1 - t from 0 (noise) to 1 (data) with velocity v_p = actions - noise =
-v, and adds the PiGDM guidance  w(tau) * g,  g = (Y - x_hat)^T diag(W) d x_hat / d x  (a VJP
through the expert), to v_p. Its weight is w = min(beta, (1 - tau) / (tau * r^2)),
r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2). Substituting tau = 1 - t:
  (1 - tau) / tau = t / (1 - t),   1 / r^2 = ((1 - t)^2 + t^2) / t^2,
  w(t) = min(beta, ((1 - t)^2 + t^2) / (t * (1 - t))),
which is infinite (so beta) at the first step t = 1, and at least 2 (at t = 1/2). Since ki's
velocity is the paper's with the sign flipped, the guided velocity is  v - w(t) * g.
"""

import flax.struct
import jax
import jax.numpy as jnp

# Soft-mask shapes over the guided overlap [d, P): the paper's exponential (its default), a linear
# ramp, all ones (guide the whole overlap fully) or zeros (only the frozen d positions).
SCHEDULES = ("exp", "linear", "ones", "zeros")
# The paper's guidance weight cap (beta = 5 in all its experiments).
DEFAULT_MAX_GUIDANCE_WEIGHT = 5.0


def check_schedule(schedule: str) -> None:
  """Raises ValueError unless `schedule` is one of SCHEDULES."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown RTC schedule {schedule!r}; known: {SCHEDULES}")


@flax.struct.dataclass
class PreviousChunk:
  """What the next chunk is conditioned on, in the model's (normalised) action space.

  actions: float32 [B, H, A] the target Y: row i is the previous chunk's action for the time step
    of the new chunk's position i (the previous chunk shifted by the steps already executed);
    rows >= prefix_length are ignored (pad them with anything finite).
  delay: int32 [B] d, the positions frozen to `actions` (clamped to prefix_length).
  prefix_length: int32 [B] P, the rows of `actions` that hold previous-chunk actions (<= H).
  max_guidance_weight: float32 [] beta, the cap on the guidance weight (0 = no guidance: the
    chunk is plain sample_actions' with its first d rows replaced).
  schedule: one of SCHEDULES, the soft mask over [d, P) (static: part of the compiled program).
  """

  actions: jax.Array
  delay: jax.Array
  prefix_length: jax.Array
  max_guidance_weight: jax.Array
  schedule: str = flax.struct.field(pytree_node=False, default="exp")


def previous_chunk(
  actions,
  delay,
  prefix_length,
  *,
  max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT,
  schedule: str = "exp",
) -> PreviousChunk:
  """A PreviousChunk with delay and prefix_length broadcast to the batch ([B] or scalars)."""
  check_schedule(schedule)
  actions = jnp.asarray(actions, jnp.float32)
  if actions.ndim != 3:
    raise ValueError(f"previous chunk actions must be [B, H, A], got shape {actions.shape}")
  batch = actions.shape[0]
  return PreviousChunk(
    actions=actions,
    delay=jnp.broadcast_to(jnp.asarray(delay, jnp.int32), (batch,)),
    prefix_length=jnp.broadcast_to(jnp.asarray(prefix_length, jnp.int32), (batch,)),
    max_guidance_weight=jnp.asarray(max_guidance_weight, jnp.float32),
    schedule=schedule,
  )


def prefix_weights(delay, prefix_length, horizon: int, schedule: str = "exp"):
  """The soft mask W: delay, prefix_length int [B] -> float32 [B, horizon].

  1 for i < d; over d <= i < P the schedule of c_i = (P - i) / (P - d + 1) (exp: the paper's
  c_i (e^c_i - 1) / (e - 1); linear: c_i); 0 for i >= P. d is clamped to P.
  """
  check_schedule(schedule)
  end = jnp.clip(jnp.asarray(prefix_length, jnp.int32), 0, horizon)[:, None]
  start = jnp.minimum(jnp.asarray(delay, jnp.int32)[:, None], end)
  index = jnp.arange(horizon)[None, :]
  if schedule == "ones":
    weights = jnp.ones((end.shape[0], horizon), jnp.float32)
  elif schedule == "zeros":
    weights = jnp.zeros((end.shape[0], horizon), jnp.float32)
  else:
    ramp = (end - index) / (end - start + 1)
    weights = jnp.clip(ramp, 0.0, 1.0).astype(jnp.float32)
    if schedule == "exp":
      weights = weights * jnp.expm1(weights) / (jnp.e - 1)
  weights = jnp.where(index < start, 1.0, weights)
  return jnp.where(index >= end, 0.0, weights).astype(jnp.float32)


def guidance_weight(time, max_guidance_weight):
  """w(t) = min(beta, ((1 - t)^2 + t^2) / (t (1 - t))) for ki's time t [B] (derivation above);
  beta wherever the ratio is infinite (t = 1 or t = 0)."""
  time = jnp.asarray(time, jnp.float32)
  denominator = time * (1.0 - time)
  finite = denominator > 0
  ratio = (jnp.square(1.0 - time) + jnp.square(time)) / jnp.where(finite, denominator, 1.0)
  return jnp.where(finite, jnp.minimum(ratio, max_guidance_weight), max_guidance_weight)


def guided_velocity(velocity_fn, x_t, time, target, weights, max_guidance_weight):
  """The PiGDM-corrected velocity at one Euler step.

  Args:
    velocity_fn: x [B, H, A] -> the model's velocity [B, H, A] at flow time `time`.
    x_t: float32 [B, H, A]; time: float32 [B].
    target: float32 [B, H, A] the previous chunk Y (model space).
    weights: float32 [B, H, A] the soft mask W (times the real-dims mask).
    max_guidance_weight: beta.
  Returns:
    float32 [B, H, A]: v - w(t) * VJP(x_hat, (Y - x_hat) * W). Examples are independent in the
    model (attention never crosses the batch), so one VJP of the batch gives each example's own.
  """
  t = time[:, None, None]

  def clean_estimate(x):
    velocity = velocity_fn(x)
    return x - t * velocity, velocity

  clean, vjp_fn, velocity = jax.vjp(clean_estimate, x_t, has_aux=True)
  (correction,) = vjp_fn((target - clean) * weights)
  weight = guidance_weight(time, max_guidance_weight)[:, None, None]
  return velocity - weight * correction


def freeze_prefix(actions, chunk: PreviousChunk):
  """actions [B, H, A] with rows i < d replaced by the previous chunk's, bit for bit."""
  delay = jnp.minimum(chunk.delay, chunk.prefix_length)
  frozen = jnp.arange(actions.shape[1])[None, :] < delay[:, None]
  return jnp.where(frozen[..., None], chunk.actions, actions)
