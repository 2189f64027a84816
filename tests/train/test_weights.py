"""Weight loaders for the three checkpoint formats, written here at tiny size, and their checks."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ki import checkpoint
from ki.model import params as params_lib
from ki.model import weights
from ki.train import sharding, state
from tests.train.tiny import tiny_model_config


@pytest.fixture(scope="module")
def abstract():
  return state.abstract_params(tiny_model_config())


def _values(abstract, offset=0.0):
  """Deterministic distinct host arrays with the model's shapes and dtypes."""
  flat = params_lib.flatten(abstract)
  return {
    name: (
      np.arange(np.prod(s.shape), dtype=np.float32).reshape(s.shape) * 1e-3 + i + offset
    ).astype(s.dtype)
    for i, (name, s) in enumerate(sorted(flat.items()))
  }


def _nest(flat):
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _assert_same(loaded, expected):
  assert sorted(loaded) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)


@pytest.mark.parametrize("nnx_values", [False, True])
def test_openpi_checkpoint_folder(tmp_path, abstract, nnx_values):
  values = _values(abstract)
  tree = _nest({f"{k}/value" if nnx_values else k: v for k, v in values.items()})
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "pi05_base" / "params", {"params": tree})
  loaded = weights.load("openpi", str(tmp_path / "pi05_base"), abstract)
  _assert_same(loaded, values)


def test_a_lora_model_loads_a_plain_checkpoint_and_keeps_fresh_adapters(tmp_path, abstract):
  """LoRA fine-tuning from pi05_base: the checkpoint has no adapters, the model does."""
  lora_abstract = state.abstract_params(
    tiny_model_config(vlm_lora_rank=2, expert_lora_rank=2, expert_lora_alpha=2.0)
  )
  adapters = [n for n in params_lib.flatten(lora_abstract) if n.endswith(("lora_a", "lora_b"))]
  assert adapters and not set(adapters) & set(params_lib.flatten(abstract))
  values = _values(abstract)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "pi05_base" / "params", {"params": _nest(values)})
  loaded = weights.load("openpi", str(tmp_path / "pi05_base"), lora_abstract)
  _assert_same(loaded, values)
  # Only adapters may be missing: a base weight missing is still an error.
  del values["PaliGemma/llm/layers/mlp/linear"]
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "partial" / "params", {"params": _nest(values)})
  with pytest.raises(weights.WeightsMismatchError, match=r"1 mismatch.*\n  missing: .*mlp/linear"):
    weights.load("openpi", str(tmp_path / "partial"), lora_abstract)


def test_paligemma_npz_fills_the_vlm_only(tmp_path, abstract):
  values = _values(abstract)
  vlm = {k: v for k, v in values.items() if not params_lib.EXPERT_PATTERN.fullmatch(k)}
  assert any(k.startswith("PaliGemma/img/") for k in vlm)
  assert "PaliGemma/llm/layers/attn/q_einsum/w" in vlm
  assert "PaliGemma/llm/layers/attn/q_einsum_1/w" not in vlm
  path = tmp_path / "pt_224.npz"
  np.savez(path, **{"params/" + k[len("PaliGemma/") :]: v for k, v in vlm.items()})
  loaded = weights.load("paligemma", str(path), abstract)
  _assert_same(loaded, vlm)


def test_our_checkpoint_latest_step(tmp_path, abstract):
  """Written by the Checkpointer with an EMA: kind "ki" reads the EMA params (the params item) of
  the latest finished step, from a workdir, its checkpoints/ folder, a step folder or the item."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  for step, offset in ((3, 0.0), (7, 5.0)):
    params = _nest(_values(abstract, offset))
    ema_params = _nest(_values(abstract, offset + 0.25))
    train_state = state.TrainState(
      step=np.int32(step),
      params=params,
      opt_state={},
      rng=np.zeros(2, np.uint32),
      ema_params=ema_params,
    )
    ckpt.save(step, train_state)
  ckpt.close()
  # A later step still being written is never read.
  (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000" / "params").mkdir(parents=True)
  step_dir = tmp_path / "checkpoints" / "7"
  for path in (tmp_path, tmp_path / "checkpoints", step_dir, step_dir / "params"):
    loaded = weights.load("ki", str(path), abstract)
    _assert_same(loaded, _values(abstract, 5.25))


def test_every_mismatch_is_listed_in_one_error(tmp_path, abstract):
  values = {
    k: v for k, v in _values(abstract).items() if not params_lib.EXPERT_PATTERN.fullmatch(k)
  }
  values["PaliGemma/img/embedding/bias"] = values["PaliGemma/img/embedding/bias"][:-1]
  values["PaliGemma/llm/final_norm/scale"] = values["PaliGemma/llm/final_norm/scale"].astype(
    np.float16
  )
  del values["PaliGemma/llm/embedder/input_embedding"]
  values["PaliGemma/llm/extra_head/kernel"] = np.zeros(3, np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **{"params/" + k[len("PaliGemma/") :]: v for k, v in values.items()})
  with pytest.raises(weights.WeightsMismatchError) as error:
    weights.load("paligemma", str(path), abstract)
  message = str(error.value)
  assert "4 mismatch(es)" in message
  assert "missing: PaliGemma/llm/embedder/input_embedding" in message
  assert "unexpected: PaliGemma/llm/extra_head/kernel" in message
  assert "shape: PaliGemma/img/embedding/bias" in message
  assert "dtype: PaliGemma/llm/final_norm/scale is float16" in message
  # A float-to-float difference is accepted when casting is asked for (e.g. bf16 checkpoints).
  values["PaliGemma/img/embedding/bias"] = _values(abstract)["PaliGemma/img/embedding/bias"]
  del values["PaliGemma/llm/extra_head/kernel"]
  with pytest.raises(weights.WeightsMismatchError, match=r"1 mismatch.*\n  missing: .*embedder"):
    np.savez(path, **{"params/" + k[len("PaliGemma/") :]: v for k, v in values.items()})
    weights.load("paligemma", str(path), abstract, cast_dtypes=True)


def test_unknown_format_and_missing_folder(tmp_path, abstract):
  with pytest.raises(ValueError, match="Unknown weights format"):
    weights.load("safetensors", str(tmp_path), abstract)
  with pytest.raises(FileNotFoundError):
    weights.load("openpi", str(tmp_path / "nowhere"), abstract)


def test_merge_keeps_shardings_and_untouched_leaves():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  params = {"a": jnp.zeros((8, 2)), "b": jnp.ones(3)}
  params = jax.device_put(params, sharding.fsdp_shardings(params, mesh, min_size_bytes=0))
  merged = weights.merge_into(params, {"a": np.full((8, 2), 2.0, np.float32)})
  np.testing.assert_array_equal(merged["a"], 2.0)
  np.testing.assert_array_equal(merged["b"], 1.0)
  assert merged["a"].sharding == params["a"].sharding


def test_fresh_expert_loads_the_vlm_and_keeps_the_seeds_expert(tmp_path):
  """init.fresh_expert (the KI ablation's arms): the VLM comes from the checkpoint, the expert
  from the run's own seed, so two seeds share the VLM and differ in the expert."""
  from ki.train import setup as setup_lib
  from tests.train.tiny import tiny_train_config

  config = tiny_train_config()
  abstract_params = state.abstract_params(setup_lib.training_model(config))
  path = tmp_path / "params"
  with ocp.PyTreeCheckpointer() as writer:
    writer.save(path, {"params": _nest(_values(abstract_params))})
  expert = params_lib.EXPERT_PATTERN
  states = {}
  for seed in (1, 2):
    overrides = {"seed": seed, "init.kind": "ki", "init.path": str(path), "init.fresh_expert": True}
    setup = setup_lib.make_setup(tiny_train_config(**overrides))
    states[seed] = params_lib.flatten(
      jax.device_get(setup.init_state(setup_lib.pretrained_weights(setup)).params)
    )
  stored = _values(abstract_params)
  for name, value in states[1].items():
    if expert.fullmatch(name):
      assert not np.array_equal(value, stored[name]), name
    else:
      np.testing.assert_array_equal(value, stored[name], err_msg=name)
      np.testing.assert_array_equal(states[2][name], value, err_msg=name)
  assert any(
    not np.array_equal(states[1][n], states[2][n]) for n in states[1] if expert.fullmatch(n)
  )
