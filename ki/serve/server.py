"""openpi's websocket policy protocol, so openpi's published client drives a ki policy unchanged.

The protocol (openpi_client.websocket_client_policy.WebsocketClientPolicy is the reference client):
  1. the client connects; the server sends its metadata, msgpack-packed (ki.msgpack_numpy, the
     same wire format as openpi_client.msgpack_numpy: numpy arrays as tagged maps);
  2. each binary message from the client is a packed observation dict; each reply is a packed dict
     with "actions" [H, 8] float32, "policy_timing" and "server_timing" {"infer_ms",
     "prev_total_ms"};
  3. HTTP GET /healthz answers 200 "OK" (for load balancers and launch scripts).

Real-time chunking (ki/serve/observation.py lists the keys, ki/serve/policy.py what they mean):
each connection remembers the last chunk it was sent, so the simplest RTC client sends only
"rtc/executed_steps" (actions of that chunk run when the observation was taken) and
"rtc/inference_delay" (actions that will run before the reply arrives); the server fills in
"rtc/previous_actions" with that chunk. A client may send "rtc/previous_actions" itself instead
(it wins). Requests without these keys are plain openpi requests.

Errors: openpi's server sends a traceback as a *text* frame and closes the connection. Its client
raises RuntimeError("Error in inference server:\n<text>") on any text frame, so we reply the
same way — a text frame naming what was wrong — but keep the connection open: the robot's next
request is served normally. Bad requests (a missing key, wrong dtype or shape, non-finite numbers, a
message over `max_message_bytes`, bytes that are not msgpack) get a one-line "bad request" reply;
anything else a traceback. A message over 4x `max_message_bytes` is refused by websockets itself
before it is read into memory: that connection closes with code 1009 (message too big), and the
server keeps serving others.

Inference runs on one worker thread, so the event loop keeps answering pings and /healthz while the
accelerator works, and requests from several clients are served one at a time.

Faults (README "When things go wrong"; tests/serve/test_server_faults.py):
  - a client that disconnects before its reply: the inference finishes, the reply is dropped, the
    disconnect is logged on one line; other clients are not affected.
  - a client that stalls (half a frame sent, or replies never read): websockets' keepalive pings
    it every `keepalive_s` and closes the connection when no pong comes back within
    `keepalive_s` (code 1011); the event loop never waits on one client.
  - a client that floods: each connection's receive buffer holds at most MAX_QUEUED_MESSAGES
    messages (websockets' max_queue; past it TCP pushes back on the sender), so a flood costs at
    most that many messages of memory, and requests go through the one inference thread in turn.
  - SIGTERM (or SIGINT) to `serve_forever`: the port closes, requests already being inferred are
    finished and answered (up to `drain_timeout_s`), later ones are refused with a text frame,
    connections close with code 1001 (going away), and the process exits 0.
"""

import asyncio
import concurrent.futures
import http
import logging
import signal
import threading
import time
import traceback
from typing import Any

import websockets.asyncio.server as ws_server
import websockets.exceptions

from ki import msgpack_numpy
from ki.serve import observation as observation_lib

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Two DROID frames at 720p are ~5.5 MB; openpi's DROID client sends 224x224 ones (~0.3 MB).
DEFAULT_MAX_MESSAGE_BYTES = 32 * 2**20
# websockets' own limit: past it the library closes the connection without buffering the message.
HARD_LIMIT_FACTOR = 4
HEALTH_PATH = "/healthz"
# Seconds between keepalive pings, and to wait for each pong: a stalled client is dropped within
# about twice this.
DEFAULT_KEEPALIVE_S = 20.0
# Messages websockets buffers per connection before it stops reading that socket.
MAX_QUEUED_MESSAGES = 2
# On SIGTERM, how long requests already being inferred get to finish.
DEFAULT_DRAIN_TIMEOUT_S = 30.0


class BadRequestError(ValueError):
  """A request the server refuses before it reaches the policy."""


class PolicyServer:
  """Serves `policy.infer` (any object with infer(dict) -> dict) over websockets."""

  def __init__(
    self,
    policy,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    metadata: dict | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
  ):
    """
    Args:
      policy: answers infer(observation dict) -> dict with "actions"; raises
        InvalidObservationError (a ValueError) for a bad observation.
      host: interface to bind; localhost by default, so nothing is exposed unless asked.
      port: TCP port; 0 picks a free one (see `port` after start).
      metadata: sent to each client on connect (default: the policy's `metadata` attribute).
      max_message_bytes: larger requests get a bad-request reply.
      keepalive_s: ping interval, pong timeout and close-handshake timeout: a client that does
        not answer within it is dropped.
      drain_timeout_s: on stop, how long requests being inferred get to finish and be answered.
    """
    self.policy = policy
    self.host = host
    self.port = port
    self.metadata = metadata if metadata is not None else dict(getattr(policy, "metadata", {}))
    self.max_message_bytes = max_message_bytes
    self.keepalive_s = keepalive_s
    self.drain_timeout_s = drain_timeout_s
    self._stopping = False  # set once stopping: new requests are refused
    self._in_flight = 0  # requests received and not yet answered
    self._executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix="policy"
    )
    self._loop: asyncio.AbstractEventLoop | None = None
    self._stop: asyncio.Event | None = None
    self._thread: threading.Thread | None = None

  # --------------------------------------------------------------------------------------------
  # Protocol.

  def _health_check(self, connection, request):
    if request.path == HEALTH_PATH:
      return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None  # carry on with the websocket handshake

  def _decode(self, message: Any) -> dict:
    if isinstance(message, str):
      raise BadRequestError("expected a binary msgpack message, got a text frame")
    if len(message) > self.max_message_bytes:
      raise BadRequestError(
        f"the message is {len(message)} bytes; the limit is "
        f"{self.max_message_bytes} (send images at 224x224, as openpi's "
        "DROID client does)"
      )
    try:
      request = msgpack_numpy.unpackb(message)
    except Exception as error:  # msgpack raises several unrelated types for garbage input
      raise BadRequestError(f"the message is not msgpack-numpy: {error!r}") from error
    if not isinstance(request, dict):
      raise BadRequestError(f"the message must be a dict, got {type(request).__name__}")
    return request

  @staticmethod
  def _with_previous_chunk(request: dict, last_actions) -> dict:
    """Fills rtc/previous_actions from the connection's last reply when the client sent only
    rtc/executed_steps (and, optionally, rtc/inference_delay)."""
    wants = observation_lib.RTC_EXECUTED_STEPS in request
    if not wants or observation_lib.RTC_PREVIOUS_ACTIONS in request:
      return request
    if last_actions is None:
      raise BadRequestError(
        f"{observation_lib.RTC_EXECUTED_STEPS} refers to the chunk last sent on this connection, "
        f"and none was sent yet: send the first request without it, or send "
        f"{observation_lib.RTC_PREVIOUS_ACTIONS}"
      )
    return {**request, observation_lib.RTC_PREVIOUS_ACTIONS: last_actions}

  async def _handle(self, websocket):
    remote = websocket.remote_address
    logging.info("Client %s connected.", remote)
    try:
      await websocket.send(msgpack_numpy.packb(self.metadata))
      await self._serve_requests(websocket)
    except websockets.exceptions.ConnectionClosed as closed:
      # The client went away (or stopped answering pings) while its reply was being sent: the
      # reply is dropped and nothing else depends on this connection.
      logging.info("Client %s disconnected before its reply (%s).", remote, closed)
      return
    logging.info("Client %s disconnected.", remote)

  async def _serve_requests(self, websocket):
    remote = websocket.remote_address
    loop = asyncio.get_running_loop()
    previous_total_ms = None
    last_actions = None  # the chunk last sent on this connection, for RTC requests
    async for message in websocket:  # ends quietly when the client disconnects
      if self._stopping:
        await websocket.send("ki policy server: shutting down; this request was not served")
        continue
      start = time.monotonic()
      self._in_flight += 1
      try:
        try:
          request = self._with_previous_chunk(self._decode(message), last_actions)
          infer_start = time.monotonic()
          result = await loop.run_in_executor(self._executor, self.policy.infer, request)
          infer_ms = 1000 * (time.monotonic() - infer_start)
        except (BadRequestError, observation_lib.InvalidObservationError) as error:
          logging.warning("Bad request from %s: %s", remote, error)
          await websocket.send(f"ki policy server: bad request: {error}")
          continue
        except Exception:  # keep serving: one bad request must not stop the robot's next one
          logging.exception("Inference failed for a request from %s.", remote)
          await websocket.send(f"ki policy server: internal error:\n{traceback.format_exc()}")
          continue
        result = dict(result)
        last_actions = result.get("actions")
        result["server_timing"] = {"infer_ms": infer_ms}
        if previous_total_ms is not None:
          result["server_timing"]["prev_total_ms"] = previous_total_ms
        await websocket.send(msgpack_numpy.packb(result))
        previous_total_ms = 1000 * (time.monotonic() - start)
      finally:
        self._in_flight -= 1

  # --------------------------------------------------------------------------------------------
  # Running.

  async def serve(self, ready: threading.Event | None = None):
    """Serves until `stop` is called; sets `ready` once listening (self.port is then bound)."""
    self._loop = asyncio.get_running_loop()
    self._stop = asyncio.Event()
    async with ws_server.serve(
      self._handle,
      self.host,
      self.port,
      process_request=self._health_check,
      # Compression costs more CPU than it saves on already-dense images (openpi disables it).
      compression=None,
      max_size=HARD_LIMIT_FACTOR * self.max_message_bytes,
      max_queue=MAX_QUEUED_MESSAGES,
      ping_interval=self.keepalive_s,
      ping_timeout=self.keepalive_s,
      # A client that does not read (a flooder) may never see our close frame: drop it as well.
      close_timeout=self.keepalive_s,
    ) as server:
      self.port = server.sockets[0].getsockname()[1]
      logging.info(
        "Serving on ws://%s:%d (health check http://%s:%d%s).",
        self.host,
        self.port,
        self.host,
        self.port,
        HEALTH_PATH,
      )
      if ready is not None:
        ready.set()
      await self._stop.wait()
      # Stop listening, let the requests being inferred finish and be answered (new ones are
      # refused); leaving the `async with` then closes every connection with 1001 (going away).
      self._stopping = True
      server.server.close()
      deadline = time.monotonic() + self.drain_timeout_s
      while self._in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
      if self._in_flight:
        logging.warning(
          "Stopping with %d request(s) unanswered after %.0f s.",
          self._in_flight,
          self.drain_timeout_s,
        )
    logging.info("Server stopped.")

  def serve_forever(self):
    """Serves until SIGTERM or SIGINT, then stops gracefully (see `serve`) and returns."""

    async def serve_until_signalled():
      loop = asyncio.get_running_loop()
      for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, self._on_signal, signum)
      await self.serve()

    asyncio.run(serve_until_signalled())
    self._executor.shutdown(wait=True)

  def _on_signal(self, signum):
    logging.warning(
      "%s received: finishing %d request(s) in flight, then stopping.",
      signal.Signals(signum).name,
      self._in_flight,
    )
    self._stop.set()

  def start_in_thread(self, timeout: float = 30.0) -> int:
    """Starts serving on a background thread; returns the bound port."""
    ready = threading.Event()
    self._thread = threading.Thread(
      target=lambda: asyncio.run(self.serve(ready)), daemon=True, name="policy-server"
    )
    self._thread.start()
    if not ready.wait(timeout):
      raise RuntimeError(f"the policy server did not start listening within {timeout} s")
    return self.port

  def stop(self):
    """Stops a server started by `serve` (from any thread) and waits for its thread."""
    if self._loop is not None and self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      self._loop = None  # closed with its thread; a second stop() is a no-op
    self._executor.shutdown(wait=True)
