"""A client of openpi's websocket policy protocol (what openpi_client's WebsocketClientPolicy does).

openpi-client itself pins numpy<2, which cannot be installed next to jax here; this is the same
sequence: connect, read the server's metadata (msgpack), then one binary send / receive per
`infer`, a text frame being the server's error. Unlike openpi's client it does not retry: an
unreachable server is an error after `open_timeout_s`, and a reply slower than `reply_timeout_s`
is an error too, never a hang.
"""

import websockets.exceptions
import websockets.sync.client

from ki import msgpack_numpy


class ServerUnreachableError(ConnectionError):
  """No policy server answered at the address (or it stopped answering)."""


class PolicyClient:
  """`PolicyClient("ws://host:port").infer(observation) -> {"actions": [H, A], ...}`."""

  def __init__(
    self, url: str, *, open_timeout_s: float = 10.0, reply_timeout_s: float | None = 300.0
  ):
    if "://" not in url:
      url = f"ws://{url}"
    self.url = url
    self.reply_timeout_s = reply_timeout_s
    try:
      self._ws = websockets.sync.client.connect(
        url, compression=None, max_size=None, open_timeout=open_timeout_s
      )
      self.metadata = msgpack_numpy.unpackb(self._ws.recv(timeout=open_timeout_s))
    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as error:
      raise ServerUnreachableError(
        f"no policy server at {url} ({type(error).__name__}: {error}); start one with "
        "`python -m ki.serve --checkpoint=...` and check the host and port"
      ) from None

  def send_raw(self, data: bytes):
    try:
      self._ws.send(data)
      response = self._ws.recv(timeout=self.reply_timeout_s)
    except (TimeoutError, websockets.exceptions.ConnectionClosed) as error:
      raise ServerUnreachableError(
        f"the policy server at {self.url} stopped answering ({type(error).__name__}: {error})"
      ) from error
    if isinstance(response, str):
      raise RuntimeError(f"Error in inference server:\n{response}")
    return msgpack_numpy.unpackb(response)

  def infer(self, observation: dict):
    return self.send_raw(msgpack_numpy.Packer().pack(observation))

  def close(self) -> None:
    self._ws.close()
