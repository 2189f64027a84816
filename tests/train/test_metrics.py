"""Metrics: MFU arithmetic, device peaks, the progress line and what reaches TensorBoard."""

import logging
import os

import pytest

from ki.train import metrics


def test_mfu_arithmetic_and_peaks():
  # 11 TFLOP per example at 18.5 examples/s on one H100: ~21% of 989 TFLOP/s.
  peak = metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3")
  mfu = metrics.model_flops_utilization(11e12, 18.5, 1, peak)
  assert mfu == pytest.approx(11e12 * 18.5 / 989e12)
  assert metrics.peak_flops_per_device("TPU v5p chip") == 459e12
  # What libtpu reports (benchmarks/results/tpu_fit.json): v5p is "TPU v5", v5e "TPU v5 lite".
  assert metrics.peak_flops_per_device("TPU v5") == 459e12
  assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
  assert metrics.peak_flops_per_device("cpu") is None
  assert metrics.model_flops_utilization(1e9, 1.0, 8, None) is None


def test_duration_format():
  assert metrics.format_duration(75) == "1m15s"
  assert metrics.format_duration(3 * 3600 + 120) == "3h02m"


def test_interval_means_throughput_and_eta(tmp_path, caplog):
  logger = metrics.MetricsLogger(
    str(tmp_path),
    total_steps=10,
    global_batch_size=4,
    flops_per_example=1e9,
    log_every=2,
    start_step=0,
  )
  logger.add_step({"loss": 2.0, "token_ce": 1.0, "flow_mse": 1.0}, data_wait_seconds=0.0)
  logger.add_step({"loss": 4.0, "token_ce": 3.0, "flow_mse": 1.0}, data_wait_seconds=0.0)
  with caplog.at_level(logging.INFO):
    written = logger.write(2, {"data/dropped/too_long": 3.0})
  logger.close()
  assert written["loss"] == 3.0 and written["token_ce"] == 2.0
  assert written["perf/examples_per_second"] == pytest.approx(4 * written["perf/steps_per_second"])
  assert written["data/dropped/too_long"] == 3.0
  assert "step 2/10 | loss 3.0000" in caplog.text and "ETA" in caplog.text
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
