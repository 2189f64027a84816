"""Orbax checkpoints: round trip of a sharded state, params item, assets, data iterator state,
retention."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ki.train import checkpoint, sharding
from ki.train.state import TrainState
from tests.train.fake_data import FakeIterator


def _state(mesh, value):
  params = {"PaliGemma": {"w": jnp.full((8, 4), value)}, "action_in_proj": {"b": jnp.arange(4.0)}}
  state = TrainState(
    step=jnp.asarray(int(value), jnp.int32),
    params=params,
    opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
    rng=jax.random.PRNGKey(3),
  )
  shardings = sharding.fsdp_shardings(state, mesh, min_size_bytes=0)
  return jax.device_put(state, shardings), shardings


def test_round_trip_with_assets_iterator_and_retention(tmp_path):
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=2, max_to_keep=2, keep_period=4)
  iterator = FakeIterator(
    batch_size=2, action_dim=8, action_horizon=2, max_token_len=4, vocab_size=10, image_size=4
  )
  for step in range(1, 9):
    next(iterator)
    state, shardings = _state(mesh, float(step))
    ckpt.save(
      step,
      state,
      data_iterator=iterator,
      assets={"norm_stats.json": b"{}", "fast/tokenizer.json": b"tok"},
    )
  ckpt.wait()
  # Last 2 (6, 8) plus the periodic keep (4).
  assert ckpt.all_steps() == [4, 6, 8]
  assert ckpt.latest_step() == 8

  shapes = jax.eval_shape(lambda: _state(mesh, 0.0)[0])
  restored_iterator = FakeIterator(
    batch_size=2, action_dim=8, action_horizon=2, max_token_len=4, vocab_size=10, image_size=4
  )
  restored = ckpt.restore(
    6, checkpoint.abstract_with_shardings(shapes, shardings), data_iterator=restored_iterator
  )
  assert int(restored.step) == 6
  np.testing.assert_array_equal(restored.params["PaliGemma"]["w"], 6.0)
  assert restored.params["PaliGemma"]["w"].sharding == shardings.params["PaliGemma"]["w"]
  np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(3))
  assert restored_iterator.index == 6
  assert ckpt.restore_assets(8) == {"fast/tokenizer.json": b"tok", "norm_stats.json": b"{}"}
  ckpt.close()

  # The params item alone, as a server would read it.
  params = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "8" / "params")
  np.testing.assert_array_equal(params["params"]["PaliGemma"]["w"], 8.0)
