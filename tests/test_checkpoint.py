"""Orbax checkpoints: the parameters stored once, exact round trips of a sharded state (with and
without an EMA), assets, data iterator state, retention, and finding the latest finished step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ki import checkpoint
from ki.model import lora, pi05
from ki.model import params as params_lib
from ki.train import sharding
from ki.train.state import TrainState
from tests.train.fake_data import FakeIterator
from tests.train.tiny import tiny_model_config


def _state(mesh, value, *, ema: bool, big: bool = False):
  """A sharded TrainState whose leaves all hold `value` (EMA leaves `value + 0.5`); `big` adds a
  4 MiB random matrix so that the bytes on disk are dominated by the parameters."""
  params = {"PaliGemma": {"w": jnp.full((8, 4), value)}, "action_in_proj": {"b": jnp.arange(4.0)}}
  if big:
    params["PaliGemma"]["big"] = jnp.asarray(
      np.random.default_rng(int(value)).standard_normal((1024, 1024)), jnp.float32
    )
  state = TrainState(
    step=jnp.asarray(int(value), jnp.int32),
    params=params,
    # Small optimizer state, so that the bytes on disk measure the parameters' copies.
    opt_state={"count": jnp.asarray(int(value), jnp.int32)},
    rng=jax.random.PRNGKey(3),
    ema_params=jax.tree.map(lambda x: x + 0.5, params) if ema else None,
  )
  shardings = sharding.fsdp_shardings(state, mesh, min_size_bytes=0)
  return jax.device_put(state, shardings), shardings


def _iterator():
  return FakeIterator(tiny_model_config(), batch_size=2)


def _bytes_under(path) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _array_names(tree) -> list[str]:
  """The '/'-joined names of the array leaves of an orbax metadata tree."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
  return sorted(params_lib.path_to_name(path) for path, leaf in leaves if leaf is not None)


@pytest.mark.parametrize("ema", [False, True])
def test_parameters_are_stored_once(tmp_path, ema):
  """openpi's split: the params item holds the weights to serve (the EMA ones with an EMA); the
  state item keeps no second copy of them, so a checkpoint is ~1x (2x with an EMA) the params."""
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  state, _ = _state(mesh, 1.0, ema=ema, big=True)
  ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  assert ckpt.save(1, state, force=True)
  ckpt.close()
  step_dir = tmp_path / checkpoint.CHECKPOINT_DIR / "1"

  with ocp.StandardCheckpointer() as reader:
    state_tree = reader.metadata(step_dir / "state").item_metadata.tree
    params_item = reader.restore(step_dir / "params")
  state_names = _array_names(state_tree)
  if ema:
    # The raw params stay in the state item (training continues from them); the EMA is the
    # params item.
    assert not [n for n in state_names if n.startswith("ema_params")], state_names
    assert "params/PaliGemma/w" in state_names
    np.testing.assert_array_equal(params_item["params"]["PaliGemma"]["w"], 1.5)
  else:
    assert not [n for n in state_names if n.startswith("params")], state_names
    np.testing.assert_array_equal(params_item["params"]["PaliGemma"]["w"], 1.0)
  assert sorted(params_item) == ["params"]  # openpi's layout

  params_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  copies = 2 if ema else 1
  assert _bytes_under(step_dir) < (copies + 0.5) * params_bytes, (
    f"{_bytes_under(step_dir)} bytes on disk for {copies} copies of {params_bytes} bytes"
  )


@pytest.mark.parametrize("ema", [False, True])
def test_round_trip_with_assets_iterator_and_retention(tmp_path, ema):
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, keep_period=4)
  iterator = _iterator()
  for step in range(1, 9):
    next(iterator)
    if step % 2:  # the caller decides when to save
      continue
    state, shardings = _state(mesh, float(step), ema=ema)
    assert ckpt.save(
      step,
      state,
      data_iterator=iterator,
      assets={"norm_stats.json": b"{}", "fast/tokenizer.json": b"tok"},
    )
  ckpt.wait()
  # Last 2 (6, 8) plus the periodic keep (4).
  assert ckpt.all_steps() == [4, 6, 8]
  assert ckpt.latest_step() == 8

  shapes = jax.eval_shape(lambda: _state(mesh, 0.0, ema=ema)[0])
  restored_iterator = _iterator()
  restored = ckpt.restore(
    6, checkpoint.abstract_with_shardings(shapes, shardings), data_iterator=restored_iterator
  )
  expected, _ = _state(mesh, 6.0, ema=ema)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want, want_sharding in zip(
    jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(shardings)
  ):
    np.testing.assert_array_equal(got, want)
    assert got.sharding == want_sharding
  assert restored_iterator.index == 6
  assert ckpt.restore_assets(8) == {"fast/tokenizer.json": b"tok", "norm_stats.json": b"{}"}
  ckpt.close()

  # The params item alone, as a server would read it: the EMA params when there is an EMA.
  params = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "8" / "params")
  np.testing.assert_array_equal(params["params"]["PaliGemma"]["w"], 8.5 if ema else 8.0)


def test_resolve_step_dir_skips_steps_being_written(tmp_path):
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  for step in (3, 5):
    ckpt.save(step, _state(mesh, float(step), ema=False)[0])
  ckpt.close()
  folder = tmp_path / checkpoint.CHECKPOINT_DIR
  # A later step orbax is still writing (a temporary name) and a stray numbered file.
  (folder / "9.orbax-checkpoint-tmp-1700000000" / "params").mkdir(parents=True)
  (folder / "11").write_text("not a checkpoint")
  step_dir = folder / "5"
  assert checkpoint.latest_step(folder) == 5
  assert checkpoint.resolve_step_dir(tmp_path) == step_dir
  assert checkpoint.resolve_step_dir(folder) == step_dir
  assert checkpoint.resolve_step_dir(step_dir) == step_dir
  assert checkpoint.latest_step(tmp_path / "empty") is None
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    checkpoint.resolve_step_dir(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.resolve_step_dir(tmp_path / "missing")


def test_lora_with_ema_serves_the_merged_ema_and_restores_both_exactly(tmp_path):
  """With adapters the params item is lora.merge(EMA params) in the plain layout; the state item
  keeps the raw params whole and, of the EMA, only what merging changed (its adapters and the
  weights they adapt); the round trip gives back every leaf bit for bit, sharded as asked."""
  config = tiny_model_config(
    vlm_lora_rank=2, vlm_lora_alpha=4.0, expert_lora_rank=3, expert_lora_alpha=3.0
  )
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: pi05.init_params(config, jax.random.key(0)))
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 2)), devices=jax.devices()[:2])
  state = TrainState(
    step=jnp.asarray(3, jnp.int32),
    params=params,
    opt_state={"count": jnp.asarray(3, jnp.int32)},
    rng=jax.random.PRNGKey(3),
    ema_params=jax.tree.map(lambda x: x + 0.5, params),
  )
  shardings = sharding.fsdp_shardings(state, mesh, min_size_bytes=0)
  state = jax.device_put(state, shardings)
  ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, model_config=config)
  ckpt.save(3, state)
  restored = ckpt.restore(3, checkpoint.abstract_with_shardings(state, shardings))
  ckpt.close()
  for got, want, want_sharding in zip(
    jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)
  ):
    np.testing.assert_array_equal(got, want)
    assert got.sharding == want_sharding

  step_dir = tmp_path / checkpoint.CHECKPOINT_DIR / "3"
  with ocp.StandardCheckpointer() as reader:
    state_names = _array_names(reader.metadata(step_dir / "state").item_metadata.tree)
    served = reader.restore(step_dir / "params")["params"]
  names = params_lib.flatten(params)
  ema_kept = {n.removeprefix("ema_params/") for n in state_names if n.startswith("ema_params/")}
  assert ema_kept == lora.changed_by_merge(names)
  assert {n for n in state_names if n.startswith("params/")} == {f"params/{n}" for n in names}
  served, ema = params_lib.flatten(served), params_lib.flatten(jax.device_get(state.ema_params))
  assert set(served) == {n for n in names if not lora.is_adapter(n)}
  # Merging changes exactly the adapted weights (ki.model.lora's tests check its arithmetic).
  for name, value in served.items():
    assert np.array_equal(value, ema[name]) == (name not in ema_kept), name


def test_a_save_that_fails_in_a_collective_blames_a_lost_process_not_the_disk(
  tmp_path, monkeypatch
):
  """With several processes, orbax's save starts with an all-gather between them; when another
  process has died, gloo fails it ("Connection reset by peer"). That is a lost process: the
  message must not send the user to free disk space, and names the step being saved."""
  checkpointer = checkpoint.Checkpointer(str(tmp_path))
  gloo = jax.errors.JaxRuntimeError(
    "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
    "[127.0.0.1]:184: Connection reset by peer"
  )

  def failing_save(step, *args, **kwargs):
    raise gloo

  monkeypatch.setattr(checkpointer.manager, "save", failing_save)
  monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
  state, _ = _state(sharding.make_mesh((("data", -1), ("fsdp", 1))), 1.0, ema=False)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    checkpointer.save(4, state)
  message = str(error.value)
  assert message.startswith("Could not save checkpoint 4: a collective between the 2 processes")
  assert "Connection reset by peer" in message and "another process has stopped" in message
  assert "'the leader task' is the coordinator, process 0" in message
  assert (
    "No checkpoint was committed yet. Restart every process with the same command: they start "
    "from the beginning." in message
  )
  assert "Free space" not in message
  checkpointer.close()
