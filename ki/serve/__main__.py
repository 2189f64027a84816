r"""Serves a trained checkpoint with openpi's websocket policy protocol.

  python -m ki.serve --checkpoint=/ckpt/ki_droid [--host=127.0.0.1] [--port=8000]

--checkpoint is a step folder (<workdir>/checkpoints/<step>) or a workdir (its latest step).
sample_actions is compiled before the port opens, so the first robot request is as fast as the
rest. Drive it with openpi's client:

  from openpi_client import websocket_client_policy
  client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=8000)
  actions = client.infer(observation)["actions"]  # [H, 8]: absolute joints (7) + gripper (1)
"""

import logging

from absl import app, flags

from ki.serve import policy as policy_lib
from ki.serve import server as server_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step folder or workdir.", required=True)
_HOST = flags.DEFINE_string(
  "host", server_lib.DEFAULT_HOST, "Interface to bind; 0.0.0.0 exposes the server to the network."
)
_PORT = flags.DEFINE_integer("port", server_lib.DEFAULT_PORT, "TCP port.")
_FLOW_STEPS = flags.DEFINE_integer("num_flow_steps", 10, "Euler steps of flow decoding.")
_MAX_MESSAGE_MB = flags.DEFINE_float(
  "max_message_mb",
  server_lib.DEFAULT_MAX_MESSAGE_BYTES / 2**20,
  "Requests above this size get a bad-request reply.",
)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  policy = policy_lib.Policy.from_checkpoint(_CHECKPOINT.value, num_flow_steps=_FLOW_STEPS.value)
  logging.info("Compiled sample_actions in %.1f s.", policy.warmup())
  server = server_lib.PolicyServer(
    policy, host=_HOST.value, port=_PORT.value, max_message_bytes=int(_MAX_MESSAGE_MB.value * 2**20)
  )
  server.serve_forever()


if __name__ == "__main__":
  app.run(main)
