"""benchmarks/tpu_fit_bench.py: the fit summary, and the quick run through libtpu."""

import importlib.util
import json
import os

import pytest

from benchmarks import tpu_fit_bench
from ki import compile_check


def _cell(batch, fits, remat="nothing_saveable"):
  return dict(
    topology="v5p-8",
    action_horizon=16,
    token_weight=1.0,
    remat_policy=remat,
    per_device_batch=batch,
    fits=fits,
    memory_per_device={"total_gib": float(batch)},
  )


def test_largest_fitting_per_row():
  cells = [
    _cell(4, True),
    _cell(8, True),
    _cell(16, False),
    _cell(32, False),
    _cell(1, True, "none"),
  ]
  cells.append(dict(_cell(64, None), skipped="not compiled"))
  del cells[-1]["memory_per_device"]
  rows = tpu_fit_bench.largest_fitting(cells)
  assert rows[("v5p-8", 16, "KI", "nothing_saveable")] == {
    "largest_fitting": 8,
    "smallest_not_fitting": 16,
  }
  assert rows[("v5p-8", 16, "KI", "none")] == {"largest_fitting": 1, "smallest_not_fitting": None}


def test_train_config_sets_the_cell():
  config = tpu_fit_bench.train_config("full", horizon=50, remat="none", token_weight=0.0)
  assert config.model.action_horizon == 50 and config.model.remat_policy == "none"
  assert config.loss.token_weight == 0.0 and len(config.model.image_keys) == 2
  # Flow only is plain pi0.5: no stop-gradient (the flow loss trains the VLM).
  assert not config.model.knowledge_insulation


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.slow
def test_quick_run_writes_and_keeps_cells(tmp_path):
  # A cell from an earlier run (the table is filled over several sessions) must be kept.
  earlier = dict(
    topology="v5p-8",
    action_horizon=16,
    token_weight=1.0,
    remat_policy="none",
    per_device_batch=1,
    skipped="placeholder",
  )
  with open(os.path.join(tmp_path, "tpu_fit_quick.json"), "w") as f:
    json.dump({"cells": {"v5p-8/H16/tw1/ki1/none/b1": earlier}}, f)
  results = tpu_fit_bench.main(["--quick", "--out_dir", str(tmp_path)])
  with open(os.path.join(tmp_path, "tpu_fit_quick.json")) as f:
    record = json.load(f)
  assert set(record["cells"]) == {"v5e-4/H16/tw1/ki1/none/b2", "v5p-8/H16/tw1/ki1/none/b1"}
  cell = record["cells"]["v5e-4/H16/tw1/ki1/none/b2"]
  assert cell["fits"] is True and cell["per_device_batch"] == 2
  assert record["versions"]["libtpu"] == compile_check.libtpu_version()
  assert cell["command"] == f"python -m benchmarks.tpu_fit_bench --quick --out_dir {tmp_path}"
  table = tpu_fit_bench.markdown(results)
  assert "| yes |" in table and "placeholder" in table
