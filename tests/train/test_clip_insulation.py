"""Insulation through the whole training loop: with the gradient clipped per optimizer group
(optimizer.clip="per_group", what the KI experiment files use), KI's VLM after N steps is exactly
the VLM of a token-loss-only run (pi0-FAST: flow_weight 0) on the same batches from the same
init; with openpi's global clip it is not, because the expert's flow gradient enters the one norm
that scales the VLM's gradient too. The stop-gradient itself: tests/model/test_insulation.py."""

import jax
import numpy as np
import pytest

from ki.model import params as params_lib
from ki.train import setup as setup_lib
from ki.train import sharding
from tests.train.fake_data import FakeIterator
from tests.train.tiny import tiny_train_config

STEPS = 4


def _train(**overrides):
  """The tiny model trained STEPS steps on one device from config.seed's init, on FakeIterator's
  batches: (the VLM group's parameters by name before and after, every step's gradient norms, the
  clip norm)."""
  config = tiny_train_config(mesh=(("data", 1), ("fsdp", 1)), **overrides)
  setup = setup_lib.make_setup(config, devices=jax.devices()[:1])
  state = setup.init_state()
  labels = params_lib.flatten(setup.optimizer.labels)

  def vlm(params):
    return {n: np.asarray(x) for n, x in params_lib.flatten(params).items() if labels[n] == "vlm"}

  init = vlm(state.params)
  iterator = FakeIterator(setup.model_config, batch_size=config.batch_size)
  norms = []
  for _ in range(STEPS):
    state, metrics = setup.step(state, sharding.global_batch(next(iterator), setup.mesh))
    norms.append({k: float(v) for k, v in metrics.items() if k.startswith("grad_norm")})
  return init, vlm(state.params), norms, config.optimizer.clip_norm


# The global-clip run is tests/train/test_step.py's 1-device step (the same config): in one
# process, whichever test runs second reads it from the persistent compilation cache.
@pytest.mark.xdist_group("tiny_step_1_device")
@pytest.mark.slow  # three tiny train steps to compile: 50 s cold on 2 cores at load 5-6
def test_ki_vlm_is_the_token_only_vlm_exactly_with_per_group_clipping(compilation_cache):
  # The token-only run's expert gets no gradient (no flow loss, and the token loss never reaches
  # the expert), so its global norm is its VLM's: one run is the reference for both clips.
  init, token_only, token_norms, clip_norm = _train(**{"loss.flow_weight": 0.0})
  _, per_group, per_group_norms, _ = _train(**{"optimizer.clip": "per_group"})
  _, global_clip, global_norms, _ = _train(**{"optimizer.clip": "global"})
  # The clip (1.0, the experiments' own) acts at every step on every group that has a gradient,
  # the expert's flow gradient under KI included.
  for step in range(STEPS):
    assert token_norms[step]["grad_norm/action_expert"] == 0.0
    assert token_norms[step]["grad_norm/vlm"] > clip_norm
    for norms in (per_group_norms[step], global_norms[step]):
      assert norms["grad_norm/vlm"] > clip_norm and norms["grad_norm/action_expert"] > clip_norm
  # Under KI the VLM's gradient is the token loss's alone (the first step: same parameters).
  assert per_group_norms[0]["grad_norm/vlm"] == token_norms[0]["grad_norm/vlm"]
  assert set(per_group) == set(token_only) and len(per_group) > 10

  # Per group: every VLM leaf (SigLIP, the embedding, every VLM layer) bit-identical. The two
  # programs differ only where flow_weight (1 vs 0) enters, in the expert's part; XLA compiles
  # the VLM's part of both alike (also at its default optimisation level, checked by hand).
  differ = [n for n in per_group if not np.array_equal(per_group[n], token_only[n])]
  assert not differ, f"VLM leaves that differ from the token-only run's: {differ}"

  # The global clip: the same comparison differs in most leaves, by a sizeable part of how far
  # the VLM moved in these steps (measured: 1.6e-3 of 3.0e-3), far beyond float rounding.
  differ = [n for n in global_clip if not np.array_equal(global_clip[n], token_only[n])]
  assert len(differ) > len(global_clip) // 2, differ

  def largest(a, b):
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)

  assert largest(global_clip, token_only) > 0.2 * largest(token_only, init)
