"""A client that speaks openpi's websocket protocol, and small requests for it."""

import websockets.sync.client

from ki import msgpack_numpy
from ki.serve import observation as observation_lib

# The test servers' message limit: small enough that the oversize tests stay cheap.
MAX_MESSAGE_BYTES = 200_000


class OpenpiProtocolClient:
  """openpi_client.websocket_client_policy.WebsocketClientPolicy (openpi-client 0.1.2), minus
  its retry loop. The real package pins numpy<2, which this project cannot install next to jax;
  this is the same sequence of calls: connect, read the metadata, then one send/recv per infer,
  raising on a text frame."""

  def __init__(self, port: int):
    self._ws = websockets.sync.client.connect(
      f"ws://127.0.0.1:{port}", compression=None, max_size=None
    )
    self.metadata = msgpack_numpy.unpackb(self._ws.recv())

  def send_raw(self, data):
    self._ws.send(data)
    response = self._ws.recv()
    if isinstance(response, str):
      raise RuntimeError(f"Error in inference server:\n{response}")
    return msgpack_numpy.unpackb(response)

  def infer(self, obs):
    return self.send_raw(msgpack_numpy.Packer().pack(obs))

  def close(self):
    self._ws.close()


def small_observation(side: int = 48):
  obs = observation_lib.fake_droid_observation(height=side, width=side + 16)
  return obs
