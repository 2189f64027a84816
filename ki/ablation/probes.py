"""What the KI ablation measures at every evaluation (experiments/ki_ablation.py, stage 3).

The held-out sets are built once per process on the host (`build_probes`) and evaluated with
jitted functions of the parameters, so every arm and seed is scored on the same examples:

  knowledge   VQA accuracy restricted to the answer set of each question's type (argmax over the
              candidates' logits at the answer's first position; ki.data.synthetic_droid.
              QUESTION_TYPES), the answer loss with FAST ids excluded from the softmax
              (`text_ce_no_fast`: knowledge, not the output head's drift toward action tokens),
              the full-softmax loss and the probability mass the VLM puts on FAST ids there.
  drift       relative change of the VLM's keys and values (what the expert reads) from the
              pretrained VLM's, per layer, on held-out robot frames: ||KV - KV_0|| / ||KV_0||.
  following   counterfactual pairs: one scene and start pose, two instructions naming different
              objects. A prediction follows the instruction when its joint chunk is nearer the
              demonstration toward the named object than toward the other (chance 0.5).
  mechanism   on fixed probe batches: the norm of the flow loss's gradient reaching the VLM
              (exactly 0 under the stop-gradient), of the FAST loss's and of the VQA loss's, and
              the cosines between the VLM's flow or FAST gradient and its VQA gradient; the
              expert's adaRMS gate size (RMS of the residual gates over flow times).
  actions     held-out action error in raw units, decoded as the arm's policy would be: flow
              (sample_actions, 10 Euler steps) or FAST (sample_fast + FAST decoding).
"""

import dataclasses
import functools
import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ki import batch as batch_lib
from ki.batch import Batch, Observation
from ki.data import droid, normalize, synthetic_droid, synthetic_scene, transforms
from ki.data import images as image_lib
from ki.model import params as params_lib
from ki.model import pi05

FLOW_STEPS = 10
GATE_TIMES = np.linspace(0.05, 0.95, 10)
NUM_JOINTS = droid.NUM_JOINTS


def _stack(examples: list[Batch]) -> Batch:
  return jax.tree.map(lambda *xs: np.stack(xs), *examples)


def _batches(batch: Batch, size: int) -> list[Batch]:
  """Rows of `batch` in consecutive batches of `size`; the last is padded by repeating row 0
  (callers drop the padding by count)."""
  count = len(batch.observation.state)
  out = []
  for start in range(0, count, size):
    rows = np.arange(start, start + size)
    rows = np.where(rows < count, rows, 0)
    out.append(jax.tree.map(lambda x, rows=rows: x[rows], batch))
  return out


@dataclasses.dataclass
class VqaSet:
  """Held-out scene questions: teacher-forced examples and each question's candidate answers."""

  batch: Batch  # [N] examples with the true answer as postfix
  types: list[str]
  candidates: np.ndarray  # int32 [N, C]: first token id of each candidate answer, -1 padding
  answer: np.ndarray  # int32 [N]: index of the true answer among the candidates


def vqa_set(
  manifest: str,
  tokenizer,
  model_config,
  *,
  limit: int,
  question_types: dict[str, tuple[str, ...]] = synthetic_droid.QUESTION_TYPES,
) -> VqaSet:
  """The first `limit` questions of a typed VQA manifest (synthetic_droid.write_vlm_set, or
  ki.sim.metaworld_questions.write_vlm_set with its QUESTION_TYPES), read and tokenized by the
  training transform (no augmentation). `question_types`: each type's candidate answers."""
  root = os.path.dirname(manifest)
  with open(manifest) as f:
    entries = [json.loads(line) for line in f if line.strip()][:limit]
  transform = transforms.VlmTransform(
    tokenizer,
    model_config.action_dim,
    model_config.action_horizon,
    image_keys=model_config.image_keys,
    augment=False,
    image_size=model_config.image_size,
  )
  first_ids = {}
  for kind, words in question_types.items():
    ids = [tokenizer.prompt_tokenizer.encode(word)[0] for word in words]
    if len(set(ids)) != len(ids):
      raise ValueError(f"Answers of question type {kind!r} share a first token: {words} -> {ids}")
    first_ids[kind] = ids
  width = max(len(ids) for ids in first_ids.values())
  examples, types, candidates, answers = [], [], [], []
  for entry in entries:
    kind = entry["type"]
    if kind not in question_types:
      raise ValueError(
        f"VQA question {entry} has type {kind!r}, not one of {sorted(question_types)} (another "
        "question set's manifest?)."
      )
    with open(os.path.join(root, entry["image"]), "rb") as f:
      record = {"image": f.read(), "prompt": entry["prompt"], "answer": entry["answer"]}
    example = transform(record, np.random.default_rng(0))
    if isinstance(example, transforms.Dropped):
      raise ValueError(f"VQA question {entry} was dropped ({example.reason}).")
    examples.append(example)
    types.append(kind)
    candidates.append(first_ids[kind] + [-1] * (width - len(first_ids[kind])))
    answers.append(list(question_types[kind]).index(entry["answer"]))
  return VqaSet(_stack(examples), types, np.array(candidates, np.int32), np.array(answers))


@dataclasses.dataclass
class LanguagePairs:
  """Counterfactual instruction pairs: rows 2i and 2i+1 share scene, start pose and images and
  name different objects."""

  batch: Batch  # [2N] prompts without FAST postfix
  state: np.ndarray  # [2N, 8] raw state (7 joints + gripper)
  named: np.ndarray  # [2N, H, 7] raw joints of the demonstration toward the named object
  other: np.ndarray  # [2N, H, 7] toward the other object


def language_pairs(
  num_pairs: int, tokenizer, norm_stats, model_config, *, seed: int = 7_000_000
) -> LanguagePairs:
  """`num_pairs` scenes never used for training (their own random stream), each with two of its
  objects as targets. The demonstrations are the synthetic data's own trajectories (no
  teleoperation jitter) from the same start."""
  horizon = model_config.action_horizon
  examples, states, named, other = [], [], [], []
  for index in range(num_pairs):
    rng = np.random.default_rng([seed, index])
    scene = synthetic_scene.sample_scene(rng)
    first, second = rng.choice(len(scene.objects), size=2, replace=False)
    template = str(rng.choice(synthetic_scene.INSTRUCTION_TEMPLATES))
    trajectory_seed = int(rng.integers(2**31))
    chunks = {}
    for target in (first, second):
      trajectory = synthetic_scene.sample_trajectory(
        np.random.default_rng(trajectory_seed), scene.objects[target], idle_start=0, idle_end=0
      )
      chunks[target] = synthetic_scene.joints_from_position(trajectory.position)
    position = trajectory.position[0]  # the same start for both (same trajectory seed)
    state = np.concatenate([chunks[first][0], [0.0]]).astype(np.float32)
    cameras = {
      batch_lib.BASE_SLOT: synthetic_scene.render_exterior(
        scene, synthetic_scene.FRONT_VIEW, position, 0.0
      ),
      batch_lib.LEFT_WRIST_SLOT: synthetic_scene.render_wrist(scene, position, 0.0),
    }
    # Through JPEG and the training transform's resize, as a recorded frame would be.
    images = {
      slot: image_lib.prepare_image(
        _jpeg(image), size=model_config.image_size, rng=None, geometric=False
      )
      for slot, image in cameras.items()
    }
    normalized_state = normalize.quantile_normalize(state, norm_stats["state"])
    for target, alternative in ((first, second), (second, first)):
      obj = scene.objects[target]
      tokenized = tokenizer.tokenize_robot(
        template.format(color=obj.color, shape=obj.shape), normalized_state
      )
      examples.append(_robot_example(model_config, images, tokenized, normalized_state))
      states.append(state)
      named.append(chunks[target][1 : horizon + 1])
      other.append(chunks[alternative][1 : horizon + 1])
  return LanguagePairs(_stack(examples), np.stack(states), np.stack(named), np.stack(other))


def _jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _robot_example(model_config, images, tokenized, normalized_state) -> Batch:
  """One unbatched inference example (no actions: zeros, has_actions for the flow decoder)."""
  pad = model_config.action_dim - len(normalized_state)
  return Batch(
    observation=Observation(
      images={
        k: images.get(k, np.zeros_like(images[batch_lib.BASE_SLOT]))
        for k in model_config.image_keys
      },
      image_masks={k: np.bool_(k in images) for k in model_config.image_keys},
      state=np.pad(normalized_state.astype(np.float32), (0, pad)),
      tokenized_prompt=np.asarray(tokenized["tokenized_prompt"], np.int32),
      tokenized_prompt_mask=np.asarray(tokenized["tokenized_prompt_mask"], bool),
      token_ar_mask=np.asarray(tokenized["token_ar_mask"], np.int32),
      token_loss_mask=np.asarray(tokenized["token_loss_mask"], bool),
      has_actions=np.bool_(True),
    ),
    actions=np.zeros((model_config.action_horizon, model_config.action_dim), np.float32),
  )


def _vlm_mask(params) -> Any:
  """True for the VLM's leaves (everything outside the expert group)."""
  return params_lib.map_with_names(
    lambda name, _: not params_lib.EXPERT_PATTERN.fullmatch(name), params
  )


def _dot(a, b, mask) -> jax.Array:
  return sum(
    jnp.vdot(x, y)
    for x, y, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(mask))
    if m
  )


def _masked_mean(values, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def gradient_probe(params, config: pi05.Config, robot: Observation, actions, vqa: Observation, rng):
  """Norms of the flow, FAST and VQA losses' gradients in the VLM, and the cosines of the flow
  and FAST gradients with the VQA gradient there (config's knowledge_insulation decides whether
  the flow gradient reaches the VLM)."""

  def robot_loss(p, term):
    losses = pi05.compute_losses(p, config, robot, actions, rng)
    return jnp.mean(losses[term])

  def vqa_loss(p):
    losses = pi05.compute_losses(
      p, config, vqa, jnp.zeros_like(actions[:1]).repeat(vqa.state.shape[0], axis=0), rng
    )
    return _masked_mean(losses["token_ce"], jnp.any(vqa.token_loss_mask, axis=-1))

  mask = _vlm_mask(params)
  flow = jax.grad(robot_loss)(params, "flow_mse")
  fast = jax.grad(robot_loss)(params, "token_ce")
  answer = jax.grad(vqa_loss)(params)
  norms = {
    name: jnp.sqrt(_dot(g, g, mask))
    for name, g in (("flow", flow), ("fast", fast), ("vqa", answer))
  }
  tiny = 1e-30
  return {
    "grad_vlm/flow": norms["flow"],
    "grad_vlm/fast": norms["fast"],
    "grad_vlm/vqa": norms["vqa"],
    # NaN where the flow gradient is exactly zero (the stop-gradient): no direction to compare.
    "grad_cos/flow_vqa": jnp.where(
      norms["flow"] > tiny,
      _dot(flow, answer, mask) / (norms["flow"] * norms["vqa"] + tiny),
      jnp.nan,
    ),
    "grad_cos/fast_vqa": _dot(fast, answer, mask) / (norms["fast"] * norms["vqa"] + tiny),
  }


def adarms_gate_rms(params, config: pi05.Config) -> jax.Array:
  """RMS over flow times GATE_TIMES, layers and widths of the expert's residual gates (the third
  of each adaptive RMSNorm's modulation): 0 at initialisation, where every expert block is the
  identity."""
  time = jnp.asarray(GATE_TIMES, jnp.float32)
  x_t = jnp.zeros((len(GATE_TIMES), config.action_horizon, config.action_dim), jnp.float32)
  _, cond = pi05._apply(params, config, pi05.Pi05.embed_suffix, x_t, time)  # [T, De]
  squares, count = 0.0, 0
  for name, kernel in params_lib.named_leaves(params):
    if not (name.endswith("norm_1/Dense_0/kernel") and "layers" in name):
      continue
    bias = params_lib.flatten(params)[name[: -len("kernel")] + "bias"]
    modulation = jnp.einsum("td,ldk->ltk", cond, kernel) + bias[:, None, :]
    gate = jnp.split(modulation, 3, axis=-1)[2]
    squares, count = squares + jnp.sum(jnp.square(gate)), count + gate.size
  return jnp.sqrt(squares / count)


def kv_cache(params, config: pi05.Config, observation: Observation):
  """The VLM's per-layer keys and values on the prefix ([L, B, T, K, H] each), zero where the
  expert does not read (padding, FAST postfix)."""
  _, kv, visible = pi05.encode_prefix(params, config, observation)
  keep = visible[None, :, :, None, None]
  return tuple(jnp.where(keep, x, 0.0) for x in kv)


def kv_drift(params, config: pi05.Config, observation: Observation, reference):
  """||KV - KV_ref|| / ||KV_ref|| per layer, for keys and values: [L] each."""
  current = kv_cache(params, config, observation)

  def per_layer(a, b):
    axes = tuple(range(1, a.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(a - b), axes) / jnp.sum(jnp.square(b), axes))

  return per_layer(current[0], reference[0]), per_layer(current[1], reference[1])


def vqa_scores(params, config: pi05.Config, observation: Observation, candidates, fast_range):
  """Per question: candidate-restricted prediction (index), answer CE with and without FAST ids
  in the softmax, FAST probability mass at the answer position."""
  logits, targets, valid = pi05.text_logits(params, config, observation)
  vocab = jnp.arange(logits.shape[-1])
  is_fast = (vocab >= fast_range[0]) & (vocab < fast_range[1])
  first = logits[:, 0, :]
  candidate_logits = jnp.where(
    candidates >= 0, jnp.take_along_axis(first, jnp.maximum(candidates, 0), axis=1), -jnp.inf
  )

  def ce(masked_logits):
    log_probs = jax.nn.log_softmax(masked_logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)

  return {
    "choice": jnp.argmax(candidate_logits, axis=-1),
    "ce": ce(logits),
    "ce_no_fast": ce(jnp.where(is_fast, -jnp.inf, logits)),
    "fast_mass": jnp.sum(jnp.where(is_fast, jax.nn.softmax(first, axis=-1), 0.0), axis=-1),
  }


def fast_accuracy(params, config: pi05.Config, observation: Observation):
  """Teacher-forced next-token accuracy on the FAST postfix, per example."""
  logits, targets, valid = pi05.text_logits(params, config, observation)
  correct = (jnp.argmax(logits, axis=-1) == targets) & valid
  return jnp.sum(correct, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)


class Probes:
  """Every held-out set and jitted measurement of one model size; `measure(params, ...)` -> the
  scalars of one evaluation. Built once per process, shared by every arm and seed."""

  def __init__(
    self,
    model_config: pi05.Config,
    tokenizer,
    norm_stats,
    *,
    robot_eval: list[Batch],
    vqa: VqaSet,
    blind_vqa: VqaSet,
    pairs: LanguagePairs,
    delta_action_mask,
    batch_size: int,
    probe_size: int = 16,
  ):
    # One model config for every measurement: the token head on (fast_loss), insulation as the
    # arm has it (it changes gradients only; `measure` takes it per call).
    self.model_config = dataclasses.replace(model_config, fast_loss=True)
    self.tokenizer = tokenizer
    self.norm_stats = norm_stats
    self.delta_mask = delta_action_mask
    self.batch_size = batch_size
    self.robot = _concat(robot_eval)
    self.robot_batches = _batches(self.robot, batch_size)
    self.num_robot = len(self.robot.observation.state)
    self.vqa, self.blind_vqa, self.pairs = vqa, blind_vqa, pairs
    self.fast_range = np.array(tokenizer._fast_lm_range, np.int32)
    self.max_fast_tokens = model_config.max_loss_tokens
    probe_rows = np.linspace(0, self.num_robot - 1, probe_size).astype(int)
    self.probe_robot = jax.tree.map(lambda x: x[probe_rows], self.robot)
    self.probe_vqa = jax.tree.map(lambda x: x[:probe_size], vqa.batch)
    self._jitted = {}

  def _fn(self, name, fn, insulation=None):
    config = self.model_config
    if insulation is not None:
      config = dataclasses.replace(config, knowledge_insulation=insulation)
    key = (name, insulation)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(functools.partial(fn, config=config))
    return self._jitted[key]

  def reference_kv(self, params):
    """The pretrained VLM's keys/values on the probe frames (an arm's step-0 params)."""
    kv = self._fn("kv", lambda params, observation, config: kv_cache(params, config, observation))
    return jax.device_get(kv(params, observation=self.probe_robot.observation))

  def _vqa(self, params, vqa: VqaSet) -> dict[str, float]:
    scores = self._fn(
      "vqa",
      lambda params, observation, candidates, config: vqa_scores(
        params, config, observation, candidates, self.fast_range
      ),
    )
    count = len(vqa.answer)
    outs = []
    for start, batch in zip(range(0, count, self.batch_size), _batches(vqa.batch, self.batch_size)):
      rows = np.arange(start, start + self.batch_size)
      candidates = vqa.candidates[np.where(rows < count, rows, 0)]
      outs.append(
        jax.device_get(scores(params, observation=batch.observation, candidates=candidates))
      )
    r = {k: np.concatenate([o[k] for o in outs])[:count] for k in outs[0]}
    correct = r["choice"] == vqa.answer
    result = {
      "accuracy": float(correct.mean()),
      "ce": float(r["ce"].mean()),
      "ce_no_fast": float(r["ce_no_fast"].mean()),
      "fast_mass": float(r["fast_mass"].mean()),
    }
    for kind in dict.fromkeys(vqa.types):  # the set's own types, in first-seen order
      rows = np.array([t == kind for t in vqa.types])
      result[f"accuracy/{kind}"] = float(correct[rows].mean())
    return result

  def vqa_metrics(self, params, *, blind: bool = False) -> dict[str, float]:
    """Candidate-restricted accuracy and answer losses on the held-out questions (with blank
    images for the blind baseline)."""
    return self._vqa(params, self.blind_vqa if blind else self.vqa)

  def _predict(self, params, observations: list[Observation], decoder: str, rng) -> np.ndarray:
    """Normalised action chunks [N, H, data_action_dim] decoded as the arm's policy is."""
    out = []
    if decoder == "flow":
      sample = self._fn(
        "flow",
        lambda params, observation, rng, config: pi05.sample_actions(
          params, config, observation, rng, num_steps=FLOW_STEPS
        ),
      )
      for index, observation in enumerate(observations):
        out.append(
          np.asarray(sample(params, observation=observation, rng=jax.random.fold_in(rng, index)))
        )
      return np.concatenate(out)[..., : self.model_config.data_action_dim]
    sample = self._fn(
      "fast",
      lambda params, observation, config: pi05.sample_fast(
        params, config, observation, max_tokens=self.max_fast_tokens
      ),
    )
    horizon, dims = self.model_config.action_horizon, self.model_config.data_action_dim
    self.fast_valid = []
    for observation in observations:
      for ids in np.asarray(sample(params, observation=observation)):
        chunk, valid = self.tokenizer.decode_actions(ids, time_horizon=horizon, action_dim=dims)
        self.fast_valid.append(valid)
        out.append(np.asarray(chunk, np.float32)[None])
    return np.concatenate(out)

  def _raw(self, actions: np.ndarray) -> np.ndarray:
    return normalize.unnormalize(actions, self.norm_stats["actions"], use_quantiles=True)

  def action_metrics(self, params, decoder: str, rng) -> dict[str, float]:
    observations = [b.observation for b in self.robot_batches]
    predicted = self._predict(params, observations, decoder, rng)[: self.num_robot]
    truth = self.robot.actions[..., : self.model_config.data_action_dim]
    error = np.abs(self._raw(predicted) - self._raw(truth))
    result = {"action_mae": float(error.mean()), "action_frames": float(self.num_robot)}
    if decoder == "fast":  # chunks whose tokens do not decode (they count as zero actions)
      result["fast_decode_failures"] = 1.0 - float(np.mean(self.fast_valid[: self.num_robot]))
    accuracy = self._fn(
      "fast_accuracy",
      lambda params, observation, config: fast_accuracy(params, config, observation),
    )
    result["fast_accuracy"] = float(
      np.concatenate([np.asarray(accuracy(params, observation=o)) for o in observations])[
        : self.num_robot
      ].mean()
    )
    return result

  def following_metrics(self, params, decoder: str, rng) -> dict[str, float]:
    """Fraction of counterfactual prompts whose predicted joint chunk is nearer the named
    object's demonstration than the other's (chance 0.5), and the mean margin."""
    pairs = self.pairs
    count = len(pairs.state)
    observations = [b.observation for b in _batches(pairs.batch, self.batch_size)]
    predicted = self._raw(self._predict(params, observations, decoder, rng)[:count])
    absolute = droid.to_absolute_actions(predicted, pairs.state, self.delta_mask)
    joints = absolute[..., :NUM_JOINTS]
    to_named = np.linalg.norm(joints - pairs.named, axis=(1, 2))
    to_other = np.linalg.norm(joints - pairs.other, axis=(1, 2))
    gap = np.linalg.norm(pairs.named - pairs.other, axis=(1, 2))
    return {
      "follow_rate": float(np.mean(to_named < to_other)),
      # (d_other - d_named) / ||named - other||: 1 = on the named demonstration, -1 = the other.
      "follow_margin": float(np.mean((to_other - to_named) / np.maximum(gap, 1e-9))),
    }

  def mechanism_metrics(self, params, insulation: bool, reference_kv, rng) -> dict[str, float]:
    probe = self._fn(
      "grads",
      lambda params, robot, actions, vqa, rng, config: gradient_probe(
        params, config, robot, actions, vqa, rng
      ),
      insulation,
    )
    result = {
      k: float(v)
      for k, v in jax.device_get(
        probe(
          params,
          robot=self.probe_robot.observation,
          actions=self.probe_robot.actions,
          vqa=self.probe_vqa.observation,
          rng=rng,
        )
      ).items()
    }
    gate = self._fn("gate", lambda params, config: adarms_gate_rms(params, config))
    result["adarms_gate_rms"] = float(gate(params))
    drift = self._fn(
      "drift",
      lambda params, observation, reference, config: kv_drift(
        params, config, observation, reference
      ),
    )
    keys, values = jax.device_get(
      drift(params, observation=self.probe_robot.observation, reference=reference_kv)
    )
    result["kv_drift"] = float((np.mean(keys) + np.mean(values)) / 2)
    for layer, (k, v) in enumerate(zip(keys, values)):
      result[f"kv_drift/layer{layer}"] = float((k + v) / 2)
    return result

  def measure(self, params, *, decoder: str, insulation: bool, reference_kv, seed: int) -> dict:
    """Every scalar of one evaluation."""
    rng = jax.random.key(seed)
    result = {f"vqa/{k}": v for k, v in self.vqa_metrics(params).items()}
    result.update(self.action_metrics(params, decoder, rng))
    result.update(self.following_metrics(params, decoder, rng))
    result.update(self.mechanism_metrics(params, insulation, reference_kv, rng))
    return result


def _concat(batches: list[Batch]) -> Batch:
  return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)
