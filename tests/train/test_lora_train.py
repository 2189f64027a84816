"""LoRA through the real trainer: no gradient for the frozen base, a checkpoint whose params item
is the merged plain model that ki.serve serves with the same actions, and an exact resume of the
unmerged adapters.

One tiny LoRA trainer runs 2 steps (one compile of its step, on one device, ~15-60 s on a 2-core
CPU) in one slow test that makes every check on it.
"""

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ki import checkpoint as checkpoint_lib
from ki import compile_check
from ki.data import normalize
from ki.model import lora
from ki.model import params as params_lib
from ki.serve import observation as observation_lib
from ki.serve import policy as policy_lib
from ki.tokenizers import prompt as prompt_lib
from ki.train import setup as setup_lib
from ki.train.trainer import Trainer
from tests.serve import conftest as serve_conftest
from tests.train.fake_data import FakeIterator
from tests.train.tiny import tiny_train_config

RANKS = dict(vlm_lora_rank=2, vlm_lora_alpha=4.0, expert_lora_rank=3, expert_lora_alpha=3.0)
STEPS = 2


def _write_assets(folder) -> dict[str, str]:
  """A norm stats file and a small PaliGemma-layout tokenizer, as config.assets names them."""
  texts = [
    f"Task: {verb} the {thing}, State: {' '.join(map(str, range(i, i + 8)))};\nAction: "
    for i, (verb, thing) in enumerate(
      (v, t) for v in ("put", "move", "place", "pick") for t in ("marker", "cup", "block")
    )
  ]
  tokenizer = prompt_lib.build_sentencepiece_model(
    texts * 8, folder / "tokenizer.model", text_vocab_size=serve_conftest.TEXT_VOCAB_SIZE
  )
  stats = {"state": serve_conftest.STATE_STATS, "actions": serve_conftest.ACTION_STATS}
  normalize.save_norm_stats(stats, str(folder / "norm_stats.json"))
  return dict(norm_stats=str(folder / "norm_stats.json"), prompt_tokenizer=tokenizer)


def lora_train_config(*, frozen: bool = True, assets=None) -> ml_collections.ConfigDict:
  """The trainer tests' tiny config on one device, with ki.serve's tiny model plus adapters and
  experiments/droid_ki_lora.py's groups (frozen=False: the same model with nothing frozen)."""
  config = tiny_train_config()
  config.unlock()
  model = serve_conftest.tiny_model_config()
  config.model.update({k: getattr(model, k) for k in config.model})
  config.model.update(RANKS)
  config.mesh = (("data", 1), ("fsdp", 1))
  config.batch_size = 2
  config.total_steps = STEPS
  config.checkpoint.update(dict(every=STEPS, asynchronous=False))
  config.optimizer.group_rules = "pi05_lora"
  groups = config.optimizer.groups
  groups.vlm_lora = dict(groups.vlm)
  groups.action_expert_lora = dict(groups.action_expert)
  groups.frozen = dict(groups.vlm, frozen=frozen)
  if assets:
    config.assets.update(assets)
  config.lock()
  return config


def _trainer(setup, workdir) -> Trainer:
  iterator = FakeIterator(setup.model_config, batch_size=setup.batch_size)
  return Trainer(setup, str(workdir), iterator)


def _write_initial_checkpoint(setup, workdir) -> None:
  """Step 0 of the run, from params drawn with numpy, so that the Trainer resumes from it instead
  of compiling the model's initialiser (~20-50 s on a 2-core CPU). Drawn params also have nonzero
  residual gates, so every adapter receives gradient from the first step."""
  params = serve_conftest.random_params(setup.model_config)
  state = setup_lib.state_lib.state_from_params(
    params, jax.random.PRNGKey(0), tx=setup.optimizer.tx, use_ema=False
  )
  state = jax.device_put(state, setup.state_shardings)
  checkpointer = checkpoint_lib.Checkpointer(
    str(workdir), asynchronous=False, model_config=setup.model_config
  )
  config_json = setup.config.to_json_best_effort(indent=2).encode()  # as the Trainer writes it
  iterator = FakeIterator(setup.model_config, batch_size=setup.batch_size)
  checkpointer.save(0, state, data_iterator=iterator, assets={"config.json": config_json})
  checkpointer.close()


def _train(tmp_path_factory):
  """(setup, workdir, the state before and after training, to host) of a 2-step LoRA run."""
  folder = tmp_path_factory.mktemp("lora_run")
  setup = setup_lib.make_setup(
    lora_train_config(assets=_write_assets(folder)), devices=jax.devices()[:1]
  )
  _write_initial_checkpoint(setup, folder / "workdir")
  trainer = _trainer(setup, folder / "workdir")
  assert trainer.start_step == 0
  initial = jax.device_get(trainer.state)  # before the donated state is consumed
  trainer.run()
  trained = jax.device_get(trainer.state)
  trainer.close()
  return setup, folder / "workdir", initial, trained


def test_no_gradient_is_computed_for_the_frozen_base():
  """The LoRA step's matmuls vs the same model with nothing frozen: without the base's weight
  gradients (one matmul per frozen weight use, as large as its forward) the step does far fewer
  FLOPs. Counted on the traced program (ki.compile_check.matmul_flops), nothing compiled."""
  flops = {}
  for frozen in (True, False):
    setup = setup_lib.make_setup(lora_train_config(frozen=frozen), devices=jax.devices()[:1])
    traced = setup.step.trace(setup.abstract_state(), setup.abstract_batch())
    flops[frozen] = compile_check.matmul_flops(traced.jaxpr)
  # Measured: 0.81x on the tiny model (its language model is a small share of the FLOPs; the full
  # model's base is ~90% of its parameters). Differentiating the base too would make it 1.0x.
  assert flops[True] < 0.9 * flops[False], flops


def _check_frozen_base_is_unchanged_and_adapters_train(run):
  setup, _, initial, trained = run
  labels = params_lib.flatten(setup.optimizer.labels)
  before, after = params_lib.flatten(initial.params), params_lib.flatten(trained.params)
  assert int(trained.step) == STEPS
  for name, group in labels.items():
    if group == "frozen":
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  for name in (n for n, g in labels.items() if g in ("vlm_lora", "action_expert_lora")):
    assert not np.array_equal(after[name], before[name]), name


def _array_names(item_dir) -> set[str]:
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item_dir).item_metadata
  leaves = jax.tree_util.tree_leaves_with_path(metadata.tree, is_leaf=lambda x: x is None)
  return {params_lib.path_to_name(path) for path, leaf in leaves if leaf is not None}


def _check_checkpoint_stores_merged_params_and_the_unmerged_rest_once(run):
  setup, workdir, _, _ = run
  step_dir = checkpoint_lib.resolve_step_dir(workdir)
  names = set(params_lib.flatten(setup.state_shapes.params))
  changed = lora.changed_by_merge(names)
  plain = set(
    params_lib.flatten(setup_lib.state_lib.abstract_params(lora.without_lora(setup.model_config)))
  )
  served = {n.removeprefix("params/") for n in _array_names(step_dir / "params")}
  assert served == plain  # openpi's layout: no adapter leaves
  state_params = {
    n.removeprefix("params/") for n in _array_names(step_dir / "state") if n.startswith("params/")
  }
  # The state keeps just what the merged tree cannot give back: the adapters and their weights.
  assert state_params == changed and changed < names


def _check_lora_checkpoint_serves_the_merged_model_with_the_same_actions(run):
  setup, workdir, _, trained = run
  policy = policy_lib.Policy.from_checkpoint(str(workdir))
  assert policy.model_config == lora.without_lora(setup.model_config)
  unmerged = policy_lib.Policy(
    trained.params,
    setup.model_config,
    policy.tokenizer,
    policy.norm_stats,
    delta_action_mask=policy.delta_action_mask,
  )
  request = observation_lib.fake_droid_observation()
  # Both policies' first request uses the same noise (seed 0, request 1).
  served, reference = policy.infer(request)["actions"], unmerged.infer(request)["actions"]
  assert np.all(np.isfinite(served))
  np.testing.assert_allclose(served, reference, rtol=1e-4, atol=1e-5)


def _check_resume_restores_the_unmerged_state_exactly(run):
  setup, workdir, _, trained = run
  resumed = _trainer(setup, workdir)
  assert resumed.start_step == STEPS
  restored = jax.device_get(resumed.state)
  resumed.close()
  assert jax.tree.structure(restored) == jax.tree.structure(trained)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(trained), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # trains 2 steps: one compile of the LoRA step (~15-60 s on a 2-core CPU)
def test_lora_run_trains_checkpoints_serves_and_resumes(tmp_path_factory):
  """One run for every check (one test, so that no xdist split trains it twice)."""
  run = _train(tmp_path_factory)
  _check_frozen_base_is_unchanged_and_adapters_train(run)
  _check_checkpoint_stores_merged_params_and_the_unmerged_rest_once(run)
  _check_lora_checkpoint_serves_the_merged_model_with_the_same_actions(run)
  _check_resume_restores_the_unmerged_state_exactly(run)
