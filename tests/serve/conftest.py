"""A tiny trained-looking checkpoint, written the way the trainer writes one, and its Policy."""

import jax
import numpy as np
import pytest

from ki import checkpoint as checkpoint_lib
from ki.data import normalize
from ki.model import pi05
from ki.serve import policy as policy_lib
from ki.serve import server as server_lib
from ki.tokenizers import prompt as prompt_lib
from ki.train.state import TrainState
from tests.serve.client import MAX_MESSAGE_BYTES, OpenpiProtocolClient
from tests.train import tiny

TEXT_VOCAB_SIZE = 300
STEP = 7
# Joints are delta actions in training: their stats are small around 0. The gripper is absolute
# and its stats are put far from 0 so that a missed unnormalisation cannot pass the tests.
ACTION_STATS = normalize.NormStats(
  mean=np.zeros(8),
  std=np.ones(8),
  q01=np.array([-0.1] * 7 + [1000.0]),
  q99=np.array([0.1] * 7 + [1001.0]),
)
STATE_STATS = normalize.NormStats(
  mean=np.zeros(8),
  std=np.ones(8),
  q01=np.array([-3.0] * 7 + [0.0]),
  q99=np.array([3.0] * 7 + [1.0]),
)


def tiny_model_config() -> pi05.Config:
  """The trainer tests' tiny model with the test tokenizer's vocabulary and room for prompts."""
  return tiny.tiny_model_config(
    max_token_len=96,
    max_loss_tokens=8,
    vocab_size=TEXT_VOCAB_SIZE + prompt_lib.NUM_LOC_PIECES + prompt_lib.NUM_SEG_PIECES,
  )


def _experiment_config_json(model_config: pi05.Config) -> bytes:
  """The smoke experiment's config with the tiny model, serialised as the trainer does."""
  from experiments import droid_ki  # pylint: disable=g-import-not-at-top

  config = droid_ki.get_config("smoke")
  config.unlock()
  config.model.update({k: getattr(model_config, k) for k in config.model})
  return config.to_json_best_effort(indent=2).encode()


def random_params(model_config: pi05.Config, seed: int = 0) -> dict:
  """Params of the model's shapes drawn with numpy, like a trained model's (no zero projections).

  Compiling pi05.init_params costs ~20 s on a 2-core CPU; the shapes alone come from eval_shape.
  Matrices get a 1/sqrt(fan-in) scale so activations stay O(1) through the layers.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: pi05.init_params(model_config, jax.random.key(0)))

  def draw(shape):
    scale = 1.0 / np.sqrt(shape.shape[-2]) if len(shape.shape) >= 2 else 0.05
    return (scale * rng.standard_normal(shape.shape)).astype(shape.dtype)

  return jax.tree.map(draw, shapes)


def write_checkpoint(workdir, model_config: pi05.Config) -> None:
  """<workdir>/checkpoints/<STEP>/ with the params, state and assets items."""
  texts = [
    f"Task: {verb} the {thing} in the {place}, State: {' '.join(map(str, range(i, i + 8)))};"
    "\nAction: "
    for i, (verb, thing, place) in enumerate(
      (v, t, p)
      for v in ("put", "move", "place")
      for t in ("marker", "cup", "block")
      for p in ("cup", "bowl", "drawer")
    )
  ]
  prompt_lib.build_sentencepiece_model(
    texts * 8, workdir / "tokenizer.model", text_vocab_size=TEXT_VOCAB_SIZE
  )
  normalize.save_norm_stats(
    {"state": STATE_STATS, "actions": ACTION_STATS}, str(workdir / "norm_stats.json")
  )
  params = random_params(model_config)
  state = TrainState(step=np.int32(STEP), params=params, opt_state={}, rng=jax.random.PRNGKey(0))
  assets = {
    "config.json": _experiment_config_json(model_config),
    "norm_stats.json": (workdir / "norm_stats.json").read_bytes(),
    "tokenizer.model": (workdir / "tokenizer.model").read_bytes(),
  }
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), asynchronous=False)
  checkpointer.save(STEP, state, assets=assets, force=True)
  checkpointer.close()


@pytest.fixture(scope="session")
def checkpoint_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("serve_workdir")
  write_checkpoint(workdir, tiny_model_config())
  return workdir


@pytest.fixture(scope="session")
def policy(checkpoint_workdir):
  policy = policy_lib.Policy.from_checkpoint(str(checkpoint_workdir))
  policy.warmup()
  return policy


@pytest.fixture(scope="module")
def server(policy):
  server = server_lib.PolicyServer(policy, port=0, max_message_bytes=MAX_MESSAGE_BYTES)
  server.start_in_thread()
  yield server
  server.stop()


@pytest.fixture
def client(server):
  client = OpenpiProtocolClient(server.port)
  yield client
  client.close()
