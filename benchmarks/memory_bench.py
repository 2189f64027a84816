r"""Peak device memory of full-size pi0.5-KI training per batch size and rematerialisation policy.

  python -m benchmarks.memory_bench           # full pi0.5-KI, batch 8/16/32, every policy (GPU)
  python -m benchmarks.memory_bench --quick   # the tiny model, two policies (CPU, tests)

For each (remat policy, per-device batch) the trainer's step (benchmarks/train_bench.py's
build_train_step: FSDP over every device, donated state) is compiled for abstract inputs — nothing
is allocated, so a configuration that would not fit is still measured — and XLA's
compiled.memory_analysis() gives the bytes per device:

  peak = arguments + outputs - aliased (the donated state) + temporaries

which is what the allocator must hold at the step's high-water mark (plus the generated code).
Per policy, the largest batch that fits a device is reported twice: the largest tested batch
under the budget (80 GB by default: an H100/A100-80GB; 141 GB for an H200 with
--device_gib=141), and the batch where the straight line through the measured points crosses the
budget (memory grows linearly with the batch: fixed state + per-example activations).

On a CPU the numbers are the CPU compiler's, which plans memory differently from the GPU's; run
without --quick on the GPU that will train. Writes benchmarks/results/memory.json
(memory_quick.json with --quick) and prints a markdown table.
"""

import argparse
from typing import Any

import jax
import numpy as np

from benchmarks import results_writer, train_bench

REMAT_POLICIES = ("none", "nothing_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots")
BATCHES = (8, 16, 32)
GIB = 2**30


def analyse(
  size: str,
  remat: str,
  per_device_batch: int,
  *,
  num_devices: int | None,
  compiler_options: dict | None = None,
) -> dict[str, Any]:
  """Compiles one configuration for abstract inputs; returns its memory per device in GiB."""
  config = train_bench.model_config(size, remat_policy=remat)
  setup = train_bench.build_train_step(config, per_device_batch, num_devices=num_devices)
  compiled = setup.lower().compile(compiler_options=compiler_options)
  memory = compiled.memory_analysis()
  if memory is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  peak = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )
  return {
    "remat_policy": remat,
    "per_device_batch": per_device_batch,
    "arguments_gib": memory.argument_size_in_bytes / GIB,
    "outputs_gib": memory.output_size_in_bytes / GIB,
    "aliased_gib": memory.alias_size_in_bytes / GIB,
    "temporaries_gib": memory.temp_size_in_bytes / GIB,
    "generated_code_gib": memory.generated_code_size_in_bytes / GIB,
    "peak_gib": peak / GIB,
  }


def largest_batch(rows: list[dict[str, Any]], budget_gib: float) -> dict[str, Any]:
  """Per policy: the largest measured batch under the budget, and the linear-fit crossing."""
  measured = [r for r in rows if r["peak_gib"] <= budget_gib]
  result = {
    "largest_tested_batch_that_fits": max((r["per_device_batch"] for r in measured), default=None)
  }
  if len(rows) >= 2:
    batches = np.array([r["per_device_batch"] for r in rows], float)
    peaks = np.array([r["peak_gib"] for r in rows])
    slope, intercept = np.polyfit(batches, peaks, 1)
    result["gib_per_example"] = float(slope)
    result["fixed_gib"] = float(intercept)
    # The small tolerance keeps an exact fit (e.g. 25.0 computed as 24.9999999) on its integer.
    result["estimated_max_batch"] = (
      int(np.floor((budget_gib - intercept) / slope + 1e-6)) if slope > 0 else None
    )
  return result


def run(
  size: str,
  policies,
  batches,
  *,
  budget_gib: float,
  num_devices: int | None,
  compiler_options: dict | None = None,
) -> dict[str, Any]:
  rows = [
    analyse(size, remat, batch, num_devices=num_devices, compiler_options=compiler_options)
    for remat in policies
    for batch in batches
  ]
  fits = {
    remat: largest_batch([r for r in rows if r["remat_policy"] == remat], budget_gib)
    for remat in policies
  }
  return {
    "size": size,
    "budget_gib": budget_gib,
    "results": rows,
    "largest_batch": fits,
    "compiler_options": compiler_options,
  }


def markdown(results: dict[str, Any]) -> str:
  rows = [
    [
      r["remat_policy"],
      r["per_device_batch"],
      r["peak_gib"],
      r["temporaries_gib"],
      r["arguments_gib"],
    ]
    for r in results["results"]
  ]
  table = results_writer.markdown_table(
    f"Training memory per device, {results['size']} model, on {results['device']}",
    ["remat", "batch/device", "peak GiB", "temporaries GiB", "arguments GiB"],
    rows,
  )
  fits = [
    [remat, f["largest_tested_batch_that_fits"], f.get("estimated_max_batch")]
    for remat, f in results["largest_batch"].items()
  ]
  return (
    table
    + "\n\n"
    + results_writer.markdown_table(
      f"Largest batch per device under {results['budget_gib']:.0f} GiB",
      ["remat", "largest tested", "linear estimate"],
      fits,
    )
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, 2 policies (CPU, tests)")
  parser.add_argument("--size", default="full", choices=list(train_bench.SIZES))
  parser.add_argument("--policies", default=",".join(REMAT_POLICIES))
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument(
    "--device_gib",
    type=float,
    default=80 * 1e9 / GIB,
    help="memory budget per device in GiB (default 80 GB = 74.5 GiB)",
  )
  parser.add_argument("--num_devices", type=int, default=None, help="default: all")
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  size, num_devices = args.size, args.num_devices
  policies = [p for p in args.policies.split(",") if p]
  batches = [int(b) for b in args.batches.split(",") if b]
  if args.quick:
    # Compiling the tiny step costs ~20 s on a 2-core CPU: two policies at one batch.
    size, policies, batches, num_devices = "tiny", ["none", "nothing_saveable"], [8], 1
  elif size not in train_bench.CPU_SIZES and not results_writer.has_accelerator():
    parser.error(
      f"--size={size} needs an accelerator (compiling it on a CPU takes very long "
      "and measures the CPU compiler); use --quick or --size=smoke"
    )
  results = run(
    size,
    policies,
    batches,
    budget_gib=args.device_gib,
    num_devices=num_devices,
    compiler_options=train_bench.QUICK_COMPILER_OPTIONS if args.quick else None,
  )
  return results_writer.publish(
    "memory", results, quick=args.quick, argv=argv, out_dir=args.out_dir, table=markdown
  )


if __name__ == "__main__":
  main()
