r"""Training throughput and MFU of the real train step, from a tiny model up to full pi0.5-KI.

  python -m benchmarks.train_bench            # every size the device can hold (full on a GPU)
  python -m benchmarks.train_bench --quick    # the tiny model only, a few steps (CPU, tests)
  python -m benchmarks.train_bench --sizes=full --per_device_batch=32 --remat=nothing_saveable
  python -m benchmarks.train_bench --sizes=full --profile_dir=/tmp/ki_profile   # where time goes
  python -m benchmarks.train_bench --sizes=full \
    --ablations=baseline,remat_none,remat_dots,empty_camera_slot,logits_everywhere,float32,fused_attention

Runs the trainer's own step (ki.train.setup.make_setup: openpi's optimizer from
ki.train.config, the state born sharded over an FSDP mesh of every device, the step jitted with
donated state), a fixed batch already on the devices (data throughput is
benchmarks/data_bench.py's job). It reports compile time, the compiled memory estimate,
samples/s and

  MFU = training_flops_per_example * samples/s / (num_devices * peak bf16 FLOP/s per device),

with the model FLOPs of ki.model.flops (no remat recomputation counted) and the peak table of
ki.train.metrics (H100/H200 989 TFLOP/s dense bf16, A100 312); on a CPU the peak is unknown and no
MFU is reported. Targets for full pi0.5-KI on one H100 (issue 6): >= 40% MFU and >= 37 samples/s
(twice openpi's ~18.5 samples/s per H100 on DROID).

The sizes above `smoke` run only on an accelerator: on a CPU they would take hours and say nothing.
Writes benchmarks/results/train.json (train_quick.json with --quick) and prints a markdown table.
"""

import argparse
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from benchmarks import results_writer
from ki import batch as batch_lib
from ki.model import pi05, sizes
from ki.train import config as config_lib
from ki.train import metrics as metrics_lib
from ki.train import setup as setup_lib
from ki.train import sharding as sharding_lib

# Model sizes, smallest first (ki.model.sizes): tiny/smoke on a CPU, the rest on an accelerator.
SIZES = tuple(sizes.SIZES)
CPU_SIZES = ("tiny", "smoke")
# Before/after for what the model does for speed: each variant undoes one choice of the trained
# configuration (compare samples/s: the model FLOPs, and so MFU, change with some of them).
ABLATIONS = {
  "baseline": ("the configuration as trained", lambda c: {}),
  "remat_none": ("no rematerialisation", lambda c: {"remat_policy": "none"}),
  "remat_dots": (
    "remat saving matmul outputs",
    lambda c: {"remat_policy": "dots_with_no_batch_dims_saveable"},
  ),
  "empty_camera_slot": (
    "openpi's third, always-empty camera slot encoded too",
    lambda c: {"image_keys": tuple(c.image_keys) + ("right_wrist_0_rgb",)},
  ),
  "logits_everywhere": (
    "vocabulary logits at every text position, not only loss positions",
    lambda c: {"max_loss_tokens": c.max_token_len - 1},
  ),
  "float32": ("float32 compute instead of bfloat16", lambda c: {"dtype": "float32"}),
  # The other direction: a kernel the trained configuration does not use yet (GPU question).
  "fused_attention": (
    "jax.nn.dot_product_attention (cuDNN flash attention where it fits)",
    lambda c: {"attention_impl": "dot_product_attention"},
  ),
}
# Quick mode checks that the code runs and its numbers are sane, not speed: XLA's CPU backend
# without its expensive passes compiles the tiny step in half the time (same memory plan).
QUICK_COMPILER_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


def model_config(size: str, **overrides) -> pi05.Config:
  """A size of ki.model.sizes with `overrides` applied."""
  return pi05.Config(**sizes.fields(size, **overrides)).validate()


def build_train_step(
  model: pi05.Config, per_device_batch: int, *, num_devices: int | None = None
) -> setup_lib.TrainSetup:
  """The trainer's own setup (ki.train.setup) for `model` with the default training config
  (openpi's optimizer, FSDP over the first `num_devices` devices, default all)."""
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  config = config_lib.default_config()
  config.model.update({k: v for k, v in dataclasses.asdict(model).items() if k in config.model})
  config.batch_size = per_device_batch * len(devices)
  config.loss.token_weight = 1.0 if model.fast_loss else 0.0
  config.init.kind = "scratch"
  config.lock()
  return setup_lib.make_setup(config, devices=devices)


def measure(
  config: pi05.Config,
  per_device_batch: int,
  *,
  steps: int,
  warmup_steps: int,
  num_devices: int | None = None,
  compiler_options: dict | None = None,
  profile_dir: str | None = None,
) -> dict[str, Any]:
  """Compiles the step, runs warm-up steps, times `steps` steps; returns the measurements.

  profile_dir: when set, three more steps are traced there with jax.profiler (open in
  TensorBoard's profile tab or Perfetto) to see where the step time goes.
  """
  setup = build_train_step(config, per_device_batch, num_devices=num_devices)
  state = setup.init_state()
  batch = sharding_lib.global_batch(batch_lib.fake_batch(config, setup.batch_size), setup.mesh)

  start = time.perf_counter()
  compiled = setup.step.lower(state, batch).compile(compiler_options=compiler_options)
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()

  for _ in range(warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  # The loss fetch ends the timing: every step's result must exist, as in the trainer's loop.
  loss = float(jax.device_get(metrics["loss"]))
  seconds = time.perf_counter() - start
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(3):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)

  num = setup.mesh.size
  samples_per_second = steps * setup.batch_size / seconds
  flops = pi05.training_flops_per_example(config)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  mfu = metrics_lib.model_flops_utilization(flops, samples_per_second, num, peak)
  return {
    "per_device_batch": per_device_batch,
    "global_batch": setup.batch_size,
    "num_devices": num,
    "remat_policy": config.remat_policy,
    "dtype": config.dtype,
    "steps": steps,
    "step_seconds": seconds / steps,
    "samples_per_second": samples_per_second,
    "samples_per_second_per_device": samples_per_second / num,
    "training_tflop_per_example": flops / 1e12,
    "peak_tflops_per_device": peak / 1e12 if peak else None,
    "mfu": mfu,
    "compile_seconds": compile_seconds,
    "temp_gib": memory.temp_size_in_bytes / 2**30 if memory else None,
    "final_loss": loss,
    "loss_finite": bool(np.isfinite(loss)),
  }


def run(
  sizes,
  *,
  per_device_batch: int | None,
  remat: str | None,
  steps: int,
  warmup_steps: int,
  num_devices: int | None,
  compiler_options: dict | None = None,
  profile_dir: str | None = None,
  ablations=("baseline",),
) -> dict[str, Any]:
  """One row per (size, ablation); sizes above CPU_SIZES are skipped without an accelerator."""
  rows = []
  for size in sizes:
    if size not in CPU_SIZES and not results_writer.has_accelerator():
      rows.append({"size": size, "skipped": "needs an accelerator"})
      continue
    base = model_config(size, **({"remat_policy": remat} if remat else {}))
    batch = per_device_batch or (32 if size in ("full", "gemma_300m") else 8)
    for ablation in ablations:
      config = dataclasses.replace(base, **ABLATIONS[ablation][1](base)).validate()
      try:
        row = measure(
          config,
          batch,
          steps=steps,
          warmup_steps=warmup_steps,
          num_devices=num_devices,
          compiler_options=compiler_options,
          profile_dir=profile_dir and f"{profile_dir}/{size}_{ablation}",
        )
      except Exception as error:  # e.g. out of memory at this batch: record it, go on
        if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
          raise
        row = {"per_device_batch": batch, "error": f"out of memory: {str(error)[:200]}"}
      rows.append(
        {
          "size": size,
          "ablation": ablation,
          "model": {
            k: getattr(config, k)
            for k in (
              "vlm_variant",
              "expert_variant",
              "siglip_variant",
              "image_size",
              "image_keys",
              "max_token_len",
              "max_loss_tokens",
              "action_horizon",
            )
          },
          **row,
        }
      )
  return {"results": rows, "compiler_options": compiler_options}


def markdown(results: dict[str, Any]) -> str:
  rows = []
  for r in results["results"]:
    if "samples_per_second" not in r:
      rows.append(
        [r["size"], r.get("ablation", "-")] + ["-"] * 7 + [r.get("skipped") or r.get("error")]
      )
      continue
    rows.append(
      [
        r["size"],
        r["ablation"],
        r["global_batch"],
        r["remat_policy"],
        r["dtype"],
        r["step_seconds"] * 1000,
        r["samples_per_second_per_device"],
        r["training_tflop_per_example"],
        None if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        "",
      ]
    )
  return results_writer.markdown_table(
    f"Training throughput on {results['device']}",
    [
      "size",
      "variant",
      "global batch",
      "remat",
      "dtype",
      "step ms",
      "samples/s/device",
      "TFLOP/example",
      "MFU",
      "note",
    ],
    rows,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps (CPU, tests)")
  parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {list(SIZES)}")
  parser.add_argument(
    "--per_device_batch",
    type=int,
    default=None,
    help="default: 32 for gemma_300m/full, 8 otherwise",
  )
  parser.add_argument("--remat", default=None, help="override every size's remat policy")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--num_devices", type=int, default=None, help="default: all")
  parser.add_argument(
    "--ablations",
    default="baseline",
    help=f"comma list of {list(ABLATIONS)} (before/after of each speed choice)",
  )
  parser.add_argument(
    "--profile_dir",
    default=None,
    help="trace 3 extra steps per size here (jax.profiler): where time goes",
  )
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
  ablations = [a for a in args.ablations.split(",") if a]
  unknown = [a for a in ablations if a not in ABLATIONS]
  if unknown:
    parser.error(f"unknown ablations {unknown}; choose from {list(ABLATIONS)}")
  if args.quick:
    sizes, steps, warmup_steps, num_devices, ablations = ["tiny"], 2, 1, 1, ["baseline"]
  else:
    steps, warmup_steps, num_devices = args.steps, args.warmup_steps, args.num_devices
  results = run(
    sizes,
    per_device_batch=args.per_device_batch,
    remat=args.remat,
    steps=steps,
    warmup_steps=warmup_steps,
    num_devices=num_devices,
    compiler_options=QUICK_COMPILER_OPTIONS if args.quick else None,
    profile_dir=args.profile_dir,
    ablations=ablations,
  )
  return results_writer.publish(
    "train", results, quick=args.quick, argv=argv, out_dir=args.out_dir, table=markdown
  )


if __name__ == "__main__":
  main()
