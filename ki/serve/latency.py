"""Inference latency of a model: the prefix pass, flow decoding (sample_actions) and FAST decoding
(sample_fast), at the batch a robot queries it with.

Same parameters and observation for all three (pi05.fake_observation: every camera and a pi0.5
prompt, no FAST postfix):
  prefix the cameras and the prompt once through SigLIP and the VLM into a KV cache (both
         decoders start with it);
  flow   sample_actions: the prefix, then `num_flow_steps` Euler steps of the action expert;
  fast   sample_fast: the same prefix, then greedy autoregressive decoding of `fast_tokens` tokens
         (a typical DROID chunk is ~30 FAST tokens, plus "|" and EOS: 32).
Each is jitted and compiled first; the reported time is the median (and 90th percentile) of
`repeats` calls, each ending when the result is on the host. Timings do not depend on the
parameter values. Used by benchmarks/latency_bench.py and the KI ablation (ki.ablation).
"""

import time
from typing import Any

import jax
import numpy as np

from ki.model import pi05

TYPICAL_DROID_FAST_TOKENS = 32


def time_calls(function, repeats: int) -> dict[str, float]:
  """Median and 90th percentile milliseconds of `function()` with its result on the host."""
  jax.device_get(function())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.device_get(function())
    times.append(1000 * (time.perf_counter() - start))
  return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def measure(
  config: pi05.Config,
  params,
  *,
  num_flow_steps: int = 10,
  fast_tokens: int = TYPICAL_DROID_FAST_TOKENS,
  repeats: int = 20,
  batch_size: int = 1,
) -> dict[str, Any]:
  """Times the prefix, sample_actions and sample_fast of `config` with `params`; returns the
  model's token counts, the settings, {"median_ms", "p90_ms"} per decoder and fast_over_flow."""
  observation = pi05.fake_observation(config, batch_size, with_fast=False)
  rng = jax.random.key(0)
  # The KV cache is returned, so no part of the prefix pass is dead code.
  prefix = jax.jit(lambda p, o: pi05.encode_prefix(p, config, o)[1])
  flow = jax.jit(lambda p, o, r: pi05.sample_actions(p, config, o, r, num_steps=num_flow_steps))
  fast = jax.jit(lambda p, o: pi05.sample_fast(p, config, o, max_tokens=fast_tokens))
  prefix_times = time_calls(lambda: prefix(params, observation), repeats)
  flow_times = time_calls(lambda: flow(params, observation, rng), repeats)
  fast_times = time_calls(lambda: fast(params, observation), repeats)
  return {
    "dtype": config.dtype,
    "prompt_tokens": int(np.sum(observation.tokenized_prompt_mask[0])),
    "image_tokens": config.num_image_tokens,
    "action_horizon": config.action_horizon,
    "num_flow_steps": num_flow_steps,
    "fast_tokens": fast_tokens,
    "repeats": repeats,
    "prefix": prefix_times,
    "flow": flow_times,
    "fast": fast_times,
    "fast_over_flow": fast_times["median_ms"] / flow_times["median_ms"],
  }
