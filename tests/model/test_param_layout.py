"""The full-size parameter tree equals openpi's pi0.5 checkpoint layout, without allocating it."""

import functools
import pathlib

import jax
import numpy as np

from ki.model import params as params_lib
from ki.model import pi05

# A copy of shared/reference/openpi_pi05_params.tsv (read off openpi's model definition with
# jax.eval_shape), kept beside the test so a clone on its own can run it.
REFERENCE = pathlib.Path(__file__).parent / "openpi_pi05_params.tsv"


def _reference_layout():
  layout = {}
  for line in REFERENCE.read_text().splitlines():
    if line.startswith("#") or line.startswith("path\t") or not line.strip():
      continue
    path, shape, dtype = line.split("\t")
    layout[path] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
  return layout


def _layout(tree):
  return {name: (tuple(x.shape), str(x.dtype)) for name, x in params_lib.named_leaves(tree)}


def test_full_size_tree_matches_openpi_reference():
  reference = _reference_layout()
  assert len(reference) == 51
  config = pi05.Config(action_dim=32, action_horizon=16)  # openpi's Pi0Config(pi05=True)
  shapes = jax.eval_shape(functools.partial(pi05.init_params, config), jax.random.key(0))
  ours = _layout(shapes)
  assert sorted(set(ours) ^ set(reference)) == []
  mismatched = {k: (ours[k], reference[k]) for k in reference if ours[k] != reference[k]}
  assert mismatched == {}
  assert sum(int(np.prod(s)) for s, _ in ours.values()) == 3_353_433_872


def test_expert_leaves_are_exactly_the_suffixed_ones():
  """What the optimizer's expert group will select: `_1` weights plus action/time projections."""
  config = pi05.Config()
  shapes = jax.eval_shape(functools.partial(pi05.init_params, config), jax.random.key(0))
  paths = _layout(shapes)
  expert = [
    p
    for p in paths
    if not p.startswith("PaliGemma/") or p.startswith("PaliGemma/llm/") and "_1/" in p
  ]
  assert len(expert) == 19
  # SigLIP's flax auto-names end in _1 too (LayerNorm_1, Dense_1): the expert rule must not
  # match them.
  assert any(p.startswith("PaliGemma/img/") and "_1/" in p for p in paths)
