"""msgpack with numpy arrays, in the wire format of openpi's policy client.

One codec serves two purposes: the websocket policy protocol (openpi's `openpi_client.msgpack_numpy`
encodes arrays as maps with the byte keys below, so its client talks to our server unchanged) and
the per-frame records of the prepared ArrayRecord dataset.
"""

import functools

import msgpack
import numpy as np

_UNSUPPORTED_KINDS = ("V", "O", "c")


def _pack(obj):
  if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _UNSUPPORTED_KINDS:
    raise ValueError(f"Unsupported dtype for msgpack: {obj.dtype}")
  if isinstance(obj, np.ndarray):
    return {
      b"__ndarray__": True,
      b"data": np.ascontiguousarray(obj).tobytes(),
      b"dtype": obj.dtype.str,
      b"shape": obj.shape,
    }
  if isinstance(obj, np.generic):
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  return obj


def _unpack(obj):
  if b"__ndarray__" in obj:
    return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
  if b"__npgeneric__" in obj:
    return np.dtype(obj[b"dtype"]).type(obj[b"data"])
  return obj


packb = functools.partial(msgpack.packb, default=_pack)
unpackb = functools.partial(msgpack.unpackb, object_hook=_unpack)
Packer = functools.partial(msgpack.Packer, default=_pack)
