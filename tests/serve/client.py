"""A client that speaks openpi's websocket protocol, and small requests for it."""

from ki.serve import client as client_lib
from ki.serve import observation as observation_lib

# The test servers' message limit: small enough that the oversize tests stay cheap.
MAX_MESSAGE_BYTES = 200_000


class OpenpiProtocolClient(client_lib.PolicyClient):
  """ki's client of openpi's protocol (ki/serve/client.py) on a local port."""

  def __init__(self, port: int):
    super().__init__(f"ws://127.0.0.1:{port}")


def small_observation(side: int = 48):
  obs = observation_lib.fake_droid_observation(height=side, width=side + 16)
  return obs
