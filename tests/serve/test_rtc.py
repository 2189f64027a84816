"""Real-time chunking: sample_actions with a previous chunk, the Policy and the websocket server.

All on the tiny checkpoint's model (horizon 4, random weights drawn like a trained model's) and
through the Policy's two compiled programs (plain and guided sample_actions, batch 1): the delay,
the previous chunk's length and the guidance weight are traced, so every case here reuses them
and the guided one is compiled once for the file.
"""

import jax
import numpy as np
import pytest

from ki.data import droid, normalize
from ki.model import rtc
from ki.serve import observation as observation_lib
from tests.serve.client import small_observation

PREVIOUS = observation_lib.RTC_PREVIOUS_ACTIONS
EXECUTED = observation_lib.RTC_EXECUTED_STEPS
DELAY = observation_lib.RTC_INFERENCE_DELAY


@pytest.fixture(scope="module")
def model_inputs(policy):
  """One observation as the model sees it, and samplers over the Policy's compiled programs."""
  obs = small_observation()
  state = droid.state_vector(
    obs[observation_lib.JOINT_POSITION], obs[observation_lib.GRIPPER_POSITION]
  )
  images = {slot: obs[key] for slot, key in observation_lib.IMAGE_SLOTS.items()}
  inputs = policy._model_inputs(images, state, obs[observation_lib.PROMPT])

  def plain(seed):
    return np.asarray(policy._sample(policy.params, inputs, jax.random.key(seed)))[0]

  def guided(seed, target, delay, prefix_length, max_guidance_weight):
    chunk = rtc.previous_chunk(
      target[None], delay, prefix_length, max_guidance_weight=max_guidance_weight
    )
    return np.asarray(policy._sample_rtc(policy.params, inputs, jax.random.key(seed), chunk))[0]

  return plain, guided


def _shifted(chunk, executed):
  """The previous chunk's rows for the new chunk's positions: chunk[executed:], zero-padded."""
  target = np.zeros_like(chunk)
  target[: len(chunk) - executed] = chunk[executed:]
  return target


def test_sample_actions_freezes_the_first_d_rows_exactly(model_inputs):
  plain, guided = model_inputs
  target = _shifted(plain(1), 1)
  for delay in (1, 2, 3):
    actions = guided(2, target, delay, 3, rtc.DEFAULT_MAX_GUIDANCE_WEIGHT)
    np.testing.assert_array_equal(actions[:delay], target[:delay])
    assert np.all(np.isfinite(actions))


def test_zero_guidance_weight_is_plain_sample_actions(model_inputs):
  plain, guided = model_inputs
  target, naive = _shifted(plain(1), 1), plain(2)  # same seed = same noise
  np.testing.assert_allclose(guided(2, target, 0, 3, 0.0), naive, rtol=1e-5, atol=1e-5)
  frozen = guided(2, target, 2, 3, 0.0)
  np.testing.assert_allclose(frozen[2:], naive[2:], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(frozen[:2], target[:2])
  # With guidance the free rows do change (the test above is not vacuous).
  assert not np.allclose(guided(2, target, 0, 3, 5.0), naive, atol=1e-3)


def test_guidance_joins_the_previous_chunk_better_than_naive_switching(model_inputs, policy):
  """The robot has run 1 action of the previous chunk, runs 1 more (d = 1) while the new chunk
  is computed, then switches to the new chunk at row 1. The discontinuity is how far the new
  chunk's action there is from the previous chunk's own continuation (random weights make
  chunks rough in time, so the raw step from the last frozen action would mostly measure that
  roughness); over the guided overlap the soft-mask-weighted distance is what guidance reduces."""
  plain, guided = model_inputs
  dims, delay, prefix = policy.action_dims, 1, 3
  weights = np.asarray(rtc.prefix_weights(np.array([delay]), np.array([prefix]), 4))[0]
  jumps, overlaps = [], []
  for seed in range(4):
    target = _shifted(plain(100 + seed), 1)[:, :dims]
    naive = plain(200 + seed)[:, :dims]
    continued = guided(200 + seed, _shifted(plain(100 + seed), 1), delay, prefix, 5.0)[:, :dims]
    jumps.append([np.linalg.norm(c[delay] - target[delay]) for c in (continued, naive)])
    overlaps.append(
      [
        np.sum(weights[delay:prefix] * np.linalg.norm(c - target, axis=-1)[delay:prefix])
        for c in (continued, naive)
      ]
    )
  jumps, overlaps = np.array(jumps), np.array(overlaps)
  assert np.all(jumps[:, 0] < 0.5 * jumps[:, 1]), jumps  # each of the four noises
  assert jumps[:, 0].mean() < 0.3 * jumps[:, 1].mean(), jumps
  assert overlaps[:, 0].mean() < 0.6 * overlaps[:, 1].mean(), overlaps


def test_policy_maps_the_previous_chunk_to_model_space_and_freezes_d_rows(policy):
  obs = small_observation()
  previous = policy.infer(obs)["actions"]
  state = droid.state_vector(
    obs[observation_lib.JOINT_POSITION], obs[observation_lib.GRIPPER_POSITION]
  )
  # The target is the previous chunk's remaining actions in the model's space: undoing the
  # server's output path (unnormalise, delta -> absolute) gives the raw actions back.
  remaining = previous[1:]
  chunk = policy._previous_chunk(remaining, 2, state)
  assert int(chunk.prefix_length[0]) == 3 and int(chunk.delay[0]) == 2
  model_rows = np.asarray(chunk.actions)[0, :3, : policy.action_dims]
  raw = droid.to_absolute_actions(
    normalize.quantile_unnormalize(model_rows, policy.norm_stats["actions"]),
    state,
    policy.delta_action_mask,
  )
  np.testing.assert_allclose(raw, remaining, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(chunk.actions)[0, 3:] == 0)

  actions = policy.infer({**obs, PREVIOUS: previous, EXECUTED: 1, DELAY: 2})["actions"]
  assert actions.shape == previous.shape and actions.dtype == np.float32
  np.testing.assert_array_equal(actions[:2], previous[1:3])  # exactly, in raw units
  assert np.all(np.isfinite(actions))


def test_server_round_trip_with_and_without_rtc_keys(client):
  plain = client.infer(small_observation())["actions"]
  assert plain.shape == (4, 8)
  # The simplest client: the server remembers the chunk it sent on this connection.
  continued = client.infer({**small_observation(), EXECUTED: 1, DELAY: 2})["actions"]
  np.testing.assert_array_equal(continued[:2], plain[1:3])
  # A client that sends the chunk itself (here the one just received, 2 of its actions run).
  sent = client.infer({**small_observation(), PREVIOUS: continued, EXECUTED: 2, DELAY: 1})
  np.testing.assert_array_equal(sent["actions"][:1], continued[2:3])
  # Everything executed and no delay: nothing to continue, a plain chunk.
  assert client.infer({**small_observation(), EXECUTED: 4})["actions"].shape == (4, 8)
  assert client.infer(small_observation())["server_timing"]["prev_total_ms"] > 0


def test_bad_rtc_values_are_refused_and_the_server_keeps_serving(client):
  obs = small_observation()
  # executed_steps refers to the last chunk on this connection; there is none yet.
  with pytest.raises(RuntimeError, match="bad request: .*none was sent yet"):
    client.infer({**obs, EXECUTED: 0, DELAY: 1})
  chunk = client.infer(obs)["actions"]
  nan_chunk = chunk.copy()
  nan_chunk[1, 2] = np.nan
  bad = [
    ({PREVIOUS: nan_chunk}, "non-finite"),
    ({PREVIOUS: chunk[:, :7]}, r"shape \[K, 8\]"),
    ({PREVIOUS: np.concatenate([chunk, chunk])}, r"1 <= K <= 4"),
    ({PREVIOUS: chunk.astype(str)}, "real numpy array"),
    ({PREVIOUS: chunk.tolist()}, "real numpy array"),
    ({PREVIOUS: chunk, DELAY: 5}, r"inference_delay must be in \[0, 4\]"),
    ({PREVIOUS: chunk, EXECUTED: 3, DELAY: 2}, r"inference_delay must be in \[0, 1\]"),
    ({PREVIOUS: chunk, DELAY: -1}, "inference_delay must be in"),
    ({PREVIOUS: chunk, DELAY: 1.5}, "inference_delay must be an integer"),
    ({PREVIOUS: chunk, DELAY: True}, "inference_delay must be an integer"),
    ({EXECUTED: 5}, r"executed_steps must be in \[0, 4\]"),
    ({DELAY: 1}, "need a previous chunk"),
  ]
  for keys, message in bad:
    with pytest.raises(RuntimeError, match=f"bad request: .*{message}"):
      client.infer({**obs, **keys})
  # Still serving, and still remembering the last chunk it *sent* (errors do not replace it).
  actions = client.infer({**obs, EXECUTED: 2, DELAY: 2})["actions"]
  np.testing.assert_array_equal(actions[:2], chunk[2:4])


def test_closed_loop_simulation_switches_chunks_on_schedule(policy):
  """benchmarks/rtc_sim.py's robot loop on the tiny policy (H=4, s=2, d=1): asynchronous
  strategies switch chunks d steps after each observation, every s steps; sync holds still for d
  steps (its actions there are the state) and so switches every s + d steps."""
  from benchmarks import rtc_sim  # pylint: disable=g-import-not-at-top

  plan = rtc_sim.episodes(1)[0]
  length = len(plan.joints)
  rtc_run = rtc_sim.run_episode(policy, plan, "rtc", delay=1, execute_steps=2)
  assert rtc_run["actions"].shape == (length, 8) and np.all(np.isfinite(rtc_run["actions"]))
  assert rtc_run["switches"] == list(range(3, length, 2))
  sync_run = rtc_sim.run_episode(policy, plan, "sync", delay=1, execute_steps=2)
  assert sync_run["switches"] == list(range(3, length, 3))
  held = [s - 1 for s in sync_run["switches"]]
  np.testing.assert_array_equal(sync_run["actions"][held], sync_run["states"][held])
  metrics = rtc_sim.metrics(rtc_run, plan.joints)
  assert len(metrics["jumps"]) == len(rtc_run["switches"]) and len(metrics["tracking"]) == length
