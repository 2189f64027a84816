r"""Serves a trained checkpoint with openpi's websocket policy protocol.

  python -m ki.serve --checkpoint=/ckpt/ki_droid [--host=127.0.0.1] [--port=8000]

--checkpoint is a step folder (<workdir>/checkpoints/<step>) or a workdir (its latest step).
sample_actions is compiled before the port opens, so the first robot request is as fast as the
rest. Drive it with openpi's client:

  from openpi_client import websocket_client_policy
  client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=8000)
  actions = client.infer(observation)["actions"]  # [H, 8]: absolute joints (7) + gripper (1)

Real-time chunking: from the second request on, add how many actions of the last chunk had run
when the observation was taken and how many will run before the reply arrives; the reply's first
d actions are the last chunk's, and the robot switches to the new chunk at index d:

  observation["rtc/executed_steps"] = s
  observation["rtc/inference_delay"] = d  # ceil(inference latency * control rate), see README
"""

import logging

from absl import app, flags

from ki.model import rtc
from ki.serve import policy as policy_lib
from ki.serve import server as server_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step folder or workdir.", required=True)
_HOST = flags.DEFINE_string(
  "host", server_lib.DEFAULT_HOST, "Interface to bind; 0.0.0.0 exposes the server to the network."
)
_PORT = flags.DEFINE_integer("port", server_lib.DEFAULT_PORT, "TCP port.")
_FLOW_STEPS = flags.DEFINE_integer("num_flow_steps", 10, "Euler steps of flow decoding.")
_RTC_BETA = flags.DEFINE_float(
  "rtc_max_guidance_weight",
  rtc.DEFAULT_MAX_GUIDANCE_WEIGHT,
  "Real-time chunking: the cap on the guidance weight (the paper's beta; 0 = frozen prefix only).",
)
_RTC_SCHEDULE = flags.DEFINE_enum(
  "rtc_schedule", "exp", list(rtc.SCHEDULES), "Real-time chunking: soft mask over the overlap."
)
_RTC_WARMUP = flags.DEFINE_bool(
  "rtc_warmup",
  True,
  "Compile the real-time chunking program before opening the port (else on the first RTC "
  "request, which then waits for the compile).",
)
_MAX_MESSAGE_MB = flags.DEFINE_float(
  "max_message_mb",
  server_lib.DEFAULT_MAX_MESSAGE_BYTES / 2**20,
  "Requests above this size get a bad-request reply.",
)

_KEEPALIVE = flags.DEFINE_float(
  "keepalive_s",
  server_lib.DEFAULT_KEEPALIVE_S,
  "Ping clients this often and drop one that does not answer within as long (stalled clients).",
)
_DRAIN_TIMEOUT = flags.DEFINE_float(
  "drain_timeout_s",
  server_lib.DEFAULT_DRAIN_TIMEOUT_S,
  "On SIGTERM, how long requests being inferred get to finish and be answered.",
)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  policy = policy_lib.Policy.from_checkpoint(
    _CHECKPOINT.value,
    num_flow_steps=_FLOW_STEPS.value,
    rtc_max_guidance_weight=_RTC_BETA.value,
    rtc_schedule=_RTC_SCHEDULE.value,
  )
  # Both programs before the port opens, so neither the first plain nor the first RTC request
  # waits for a compile.
  logging.info(
    "Compiled sample_actions%s in %.1f s.",
    ", plain and with RTC," if _RTC_WARMUP.value else "",
    policy.warmup(rtc_too=_RTC_WARMUP.value),
  )
  server = server_lib.PolicyServer(
    policy,
    host=_HOST.value,
    port=_PORT.value,
    max_message_bytes=int(_MAX_MESSAGE_MB.value * 2**20),
    keepalive_s=_KEEPALIVE.value,
    drain_timeout_s=_DRAIN_TIMEOUT.value,
  )
  server.serve_forever()


if __name__ == "__main__":
  app.run(main)
