"""What the user sees: CLU metric writers (TensorBoard + console), a progress line with ETA, MFU.

Metrics of each step are fetched one step late (while the next step runs), averaged over the
logging interval on the host and written every `log_every` steps.
"""

import collections
import logging
import time

from clu import metric_writers
import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets. Unknown kinds (e.g. CPU) get
# no MFU rather than a made-up one.
PEAK_FLOPS_PER_DEVICE = {
  "NVIDIA H100 80GB HBM3": 989e12,
  "NVIDIA H100": 989e12,  # SXM; the PCIe and NVL cards are slower, below
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H100 NVL": 835e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
  "NVIDIA A100 80GB PCIe": 312e12,
  "NVIDIA GeForce RTX 4090": 165e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,  # v5p: libtpu's device_kind (v5e is "TPU v5 lite", matched first as longer)
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device by its jax device_kind, or None when unknown."""
  if device_kind in PEAK_FLOPS_PER_DEVICE:
    return PEAK_FLOPS_PER_DEVICE[device_kind]
  # The longest matching prefix, so "NVIDIA H100 PCIe ..." is not taken for the SXM part.
  matches = [kind for kind in PEAK_FLOPS_PER_DEVICE if device_kind.startswith(kind)]
  return PEAK_FLOPS_PER_DEVICE[max(matches, key=len)] if matches else None


def model_flops_utilization(
  flops_per_example: float,
  examples_per_second: float,
  num_devices: int,
  peak_per_device: float | None,
) -> float | None:
  """Achieved model FLOP/s over the peak of all devices (None without a known peak)."""
  if not peak_per_device:
    return None
  return flops_per_example * examples_per_second / (num_devices * peak_per_device)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLogger:
  """Accumulates per-step scalars and writes interval means with throughput, MFU and ETA."""

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    global_batch_size: int,
    flops_per_example: float,
    log_every: int,
    start_step: int,
  ):
    # Only the first host writes TensorBoard files; the others log to the console.
    self.writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.flops_per_example = flops_per_example
    self.log_every = log_every
    self.num_devices = jax.device_count()
    self.peak = peak_flops_per_device(jax.devices()[0].device_kind)
    self._sums = collections.defaultdict(float)
    self._count = 0
    self._data_wait = 0.0
    self._interval_start = time.perf_counter()
    self._interval_start_step = start_step

  def restart_clock(self):
    self._interval_start = time.perf_counter()

  def exclude_time(self, seconds: float):
    """Leaves `seconds` (e.g. an evaluation) out of the current interval's throughput."""
    self._interval_start += seconds

  def add_step(self, metrics: dict[str, float], data_wait_seconds: float):
    for name, value in metrics.items():
      self._sums[name] += float(value)
    self._count += 1
    self._data_wait += data_wait_seconds

  def write(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
    """Writes the interval's means plus timing; returns what was written."""
    if not self._count:
      return {}
    now = time.perf_counter()
    elapsed = now - self._interval_start
    steps = step - self._interval_start_step
    scalars = {name: total / self._count for name, total in self._sums.items()}
    steps_per_second = steps / elapsed if elapsed > 0 else 0.0
    scalars["perf/steps_per_second"] = steps_per_second
    scalars["perf/examples_per_second"] = steps_per_second * self.global_batch_size
    scalars["perf/data_wait_fraction"] = self._data_wait / elapsed if elapsed > 0 else 0.0
    mfu = model_flops_utilization(
      self.flops_per_example, scalars["perf/examples_per_second"], self.num_devices, self.peak
    )
    if mfu is not None:
      scalars["perf/mfu"] = mfu
    scalars.update(extra or {})
    self.writer.write_scalars(step, scalars)
    remaining = (self.total_steps - step) / steps_per_second if steps_per_second else 0.0
    logging.info(
      "step %d/%d | loss %.4f token_ce %.4f flow_mse %.4f | %.2f steps/s, %.1f examples/s%s | "
      "data wait %.0f%% | ETA %s",
      step,
      self.total_steps,
      scalars.get("loss", np.nan),
      scalars.get("token_ce", np.nan),
      scalars.get("flow_mse", np.nan),
      steps_per_second,
      scalars["perf/examples_per_second"],
      f", MFU {100 * mfu:.1f}%" if mfu is not None else "",
      100 * scalars["perf/data_wait_fraction"],
      format_duration(remaining),
    )
    self._sums.clear()
    self._count = 0
    self._data_wait = 0.0
    self._interval_start = now
    self._interval_start_step = step
    return scalars

  def write_scalars(self, step: int, scalars: dict[str, float]):
    self.writer.write_scalars(step, scalars)
    logging.info("step %d | %s", step, " ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: dict):
    self.writer.write_hparams(hparams)

  def close(self):
    self.writer.flush()
    self.writer.close()
