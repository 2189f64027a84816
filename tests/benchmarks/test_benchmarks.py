"""Each benchmark in its quick CPU mode, so they cannot rot; plus the pure helpers."""

import dataclasses
import json

import pytest

from benchmarks import latency_bench, memory_bench, results_writer, run_all, train_bench


def _read(directory, name):
  with open(directory / f"{name}.json") as f:
    return json.load(f)


def test_train_bench_quick(tmp_path, capsys):
  train_bench.main(["--quick", "--out_dir", str(tmp_path)])
  record = _read(tmp_path, "train_quick")
  assert record["command"] == f"python -m benchmarks.train_bench --quick --out_dir {tmp_path}"
  assert record["device_info"]["backend"] == "cpu"
  (row,) = record["results"]
  assert row["size"] == "tiny" and row["global_batch"] == 8 and row["steps"] == 2
  assert row["samples_per_second"] > 0 and row["loss_finite"]
  assert row["mfu"] is None  # no peak FLOP/s is known for a CPU: no invented MFU
  assert row["training_tflop_per_example"] > 0
  assert "| tiny | baseline | 8 | none | float32 |" in capsys.readouterr().out


def test_every_ablation_is_a_valid_full_config():
  base = train_bench.model_config("full")
  flops = {}
  for name, (_, overrides) in train_bench.ABLATIONS.items():
    config = dataclasses.replace(base, **overrides(base)).validate()
    flops[name] = train_bench.pi05.training_flops_per_example(config)
  # Undoing a saving costs model FLOPs where the saving was in FLOPs (not remat or dtype).
  assert flops["empty_camera_slot"] > flops["baseline"]
  assert flops["logits_everywhere"] > flops["baseline"]
  assert flops["remat_none"] == flops["baseline"] == flops["float32"]


def test_memory_bench_quick(tmp_path):
  memory_bench.main(["--quick", "--out_dir", str(tmp_path)])
  record = _read(tmp_path, "memory_quick")
  rows = {r["remat_policy"]: r for r in record["results"]}
  assert set(rows) == {"none", "nothing_saveable"}
  for row in rows.values():
    assert row["peak_gib"] > 0 and row["arguments_gib"] > 0
  # Saving nothing for the backward pass needs fewer temporaries than saving everything.
  assert rows["nothing_saveable"]["temporaries_gib"] < rows["none"]["temporaries_gib"]
  assert record["largest_batch"]["none"]["largest_tested_batch_that_fits"] == 8


def test_largest_batch_linear_estimate():
  rows = [{"per_device_batch": b, "peak_gib": 10.0 + 2.0 * b} for b in (8, 16, 32)]
  fit = memory_bench.largest_batch(rows, budget_gib=60.0)
  assert fit["largest_tested_batch_that_fits"] == 16
  assert fit["estimated_max_batch"] == 25
  assert fit["gib_per_example"] == pytest.approx(2.0) and fit["fixed_gib"] == pytest.approx(10.0)


def test_latency_bench_quick(tmp_path):
  latency_bench.main(["--quick", "--out_dir", str(tmp_path)])
  record = _read(tmp_path, "latency_tiny_quick")
  assert record["benchmark"] == "latency"
  assert record["command"] == f"python -m benchmarks.latency_bench --quick --out_dir {tmp_path}"
  assert record["size"] == "tiny" and record["num_flow_steps"] == 10
  assert record["fast_tokens"] == latency_bench.TYPICAL_DROID_FAST_TOKENS
  assert record["flow"]["median_ms"] > 0 and record["fast"]["median_ms"] > 0
  assert record["prefix"]["median_ms"] > 0
  assert record["fast_over_flow"] == pytest.approx(
    record["fast"]["median_ms"] / record["flow"]["median_ms"]
  )


def test_full_sizes_are_refused_without_an_accelerator(tmp_path):
  with pytest.raises(SystemExit):
    memory_bench.main(["--size", "full", "--out_dir", str(tmp_path)])
  with pytest.raises(SystemExit):
    latency_bench.main(["--size", "full", "--out_dir", str(tmp_path)])
  results = train_bench.run(
    ["full"], per_device_batch=None, remat=None, steps=1, warmup_steps=0, num_devices=1
  )
  assert results["results"] == [{"size": "full", "skipped": "needs an accelerator"}]


def test_run_all_plan():
  quick = dict(run_all.plan(False, accelerator=False))
  # --quick makes every benchmark write <name>_quick.json, never its committed full-mode results.
  assert all(argv == ["--quick"] for argv in quick.values())
  assert {"train_bench", "latency_bench", "data_bench", "tokenizer_bench"} <= set(quick)
  full_cpu = dict(run_all.plan(True, accelerator=False))
  assert full_cpu["memory_bench"] is None and full_cpu["train_bench"] == []
  assert dict(run_all.plan(True, accelerator=True))["memory_bench"] == []


def test_markdown_table():
  table = results_writer.markdown_table("T", ["a", "b"], [[1.23456, None], ["x", 12345.6]])
  assert table.splitlines() == ["T", "", "| a | b |", "|---|---|", "| 1.23 | - |", "| x | 12346 |"]
