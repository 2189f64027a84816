"""What every benchmark records next to its numbers: the command, the device, the time; and the
markdown table it prints.

Results go to benchmarks/results/<name>.json; README quotes them with the command and device.
"""

from collections.abc import Callable, Sequence
import datetime
import json
import os
import platform
import sys
from typing import Any

import jax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_info() -> dict[str, Any]:
  """The JAX devices the numbers came from, and how busy the host was (a shared CPU is noisy)."""
  devices = jax.devices()
  info = {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "host_cpus": os.cpu_count(),
    "machine": platform.machine(),
    "jax_version": jax.__version__,
  }
  if hasattr(os, "getloadavg"):
    info["load_average_1min"] = round(os.getloadavg()[0], 2)
  return info


def describe_device(info: dict[str, Any]) -> str:
  if info["backend"] == "cpu":
    return f"CPU, {info['host_cpus']} cores ({info['machine']})"
  return f"{info['num_devices']}x {info['device_kind']}"


def has_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def write(
  name: str,
  results: dict[str, Any],
  *,
  command: str,
  out_dir: str | None = None,
  file_stem: str | None = None,
) -> str:
  """Adds the benchmark's name, the command, device and time to `results` and writes
  <out_dir>/<file_stem or name>.json (default benchmarks/results/); returns the path."""
  info = device_info()
  record = {
    "benchmark": name,
    "command": command,
    "device": describe_device(info),
    "device_info": info,
    "utc_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    **results,
  }
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{file_stem or name}.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=2, default=_jsonable)
  return path


def publish(
  name: str,
  results: dict[str, Any],
  *,
  quick: bool,
  argv: Sequence[str] | None,
  out_dir: str | None,
  table: Callable[[dict[str, Any]], str],
  variant: str = "",
  module: str | None = None,
) -> dict[str, Any]:
  """The end of every benchmark's main: writes <name>[_<variant>][_quick].json with the command
  that produced it (`python -m <module> ...`, module benchmarks.<name>_bench by default), prints
  the table and returns the results. `variant` keeps results that differ in kind (e.g. model
  sizes) in separate files."""
  results["quick"] = quick
  args = sys.argv[1:] if argv is None else list(argv)
  command = " ".join([f"python -m {module or f'benchmarks.{name}_bench'}", *args])
  stem = "_".join([name] + ([variant] if variant else []) + (["quick"] if quick else []))
  path = write(name, results, command=command, out_dir=out_dir, file_stem=stem)
  results["device"] = describe_device(device_info())
  print(table(results))
  print(f"\nWritten to {path}")
  return results


def _jsonable(value):
  if hasattr(value, "item"):  # numpy / jax scalars
    return value.item()
  raise TypeError(f"cannot write {type(value).__name__} to JSON")


def markdown_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A titled GitHub markdown table; floats get 3 significant digits, None prints as '-'."""

  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, float):
      return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)

  lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
