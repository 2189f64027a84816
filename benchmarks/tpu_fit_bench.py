r"""Memory-fit tables for full pi0.5-KI on TPU slices, compiled on this machine (no TPU needed).

  python -m benchmarks.tpu_fit_bench                       # every cell below (hours on 2 cores)
  python -m benchmarks.tpu_fit_bench --topologies=v5p-8 --horizons=16 --policies=nothing_saveable \
    --batches=8,32 --token_weights=1,0                     # a subset; cells are added to the file
  python -m benchmarks.tpu_fit_bench --topologies=v5e-8 --horizons=16 --token_weights=1 \
    --policies=nothing_saveable --batches=4 --lora       # LoRA fine-tuning (openpi's ranks)
  python -m benchmarks.tpu_fit_bench --quick               # the tiny model on v5e-4 (tests)

Each cell is one `ki.compile_check.check` (the trainer's setup, ki.train.setup.make_setup, over
the slice's abstract devices, compiled by libtpu): full pi0.5-KI with 2 cameras, 200 prompt
tokens, the action horizon H, per-device batch B, a remat policy, and the token loss on (KI:
FAST CE + flow) or off (flow only), full fine-tuning or, with --lora, LoRA fine-tuning
(ki.train.optimizer.use_lora: openpi's ranks, the language model's base frozen and not
differentiated), on the smallest single-host slice of each generation by
default (v5p-8 and v4-8: 4 chips; v6e-8 and v5e-8: 8 chips). It records XLA's per-device memory
plan against the chip's HBM and the step's FLOPs (compiled, trip-count corrected, analytic; see
ki/compile_check.py). Per (slice, H, loss, policy) the largest measured batch under HBM is
reported; once a batch does not fit, larger batches of that row are not compiled (memory grows
with the batch) and are marked so, never estimated.

Results accumulate in benchmarks/results/tpu_fit.json (tpu_fit_quick.json with --quick): a rerun
adds or replaces the cells it compiles and keeps the others, so the table can be filled over
several sessions. A full-size compile takes ~5 minutes on a 2-core CPU and ~10 GiB of host memory.
Needs libtpu: pip install "jax[tpu]==<jax version>".
"""

import argparse
import json
import os
import sys
import time
from typing import Any

import jax

from benchmarks import results_writer
from ki import compile_check
from ki.model import lora as lora_lib
from ki.model import sizes
from ki.train import config as config_lib
from ki.train import optimizer as optimizer_lib

TOPOLOGIES = ("v5p-8", "v4-8", "v6e-8", "v5e-8")
HORIZONS = (16, 50)
BATCHES = (1, 4, 8, 16, 32)
POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "none")
TOKEN_WEIGHTS = (1.0, 0.0)  # KI (FAST CE + flow) and flow only


def train_config(size: str, *, horizon: int, remat: str, token_weight: float, lora: bool = False):
  """The default training config (openpi's DROID fine-tune, FSDP over every device) at `size`;
  `lora`: its LoRA fine-tune (ki.train.optimizer.use_lora)."""
  config = config_lib.default_config()
  config.model.update(sizes.fields(size, remat_policy=remat))
  if horizon:
    config.model.action_horizon = horizon
  config.loss.token_weight = token_weight
  # Token loss off = plain pi0.5 (experiments/pi05_flow_only.py): the flow loss trains the VLM
  # too. With the stop-gradient kept, nothing would train the VLM and its backward pass would
  # vanish from the step.
  config.model.knowledge_insulation = token_weight > 0
  config.init.kind = "scratch"
  if lora:
    optimizer_lib.use_lora(config)
  config.lock()
  return config


def cell_key(cell: dict[str, Any]) -> str:
  ki = int(cell.get("knowledge_insulation", True))
  key = (
    "{topology}/H{action_horizon}/tw{token_weight:g}/ki{ki}/{remat_policy}/b{per_device_batch}"
  ).format(ki=ki, **cell)
  return key + "/lora" if cell.get("lora") else key


def measure(size, topology, horizon, token_weight, remat, batch, lora=False) -> dict[str, Any]:
  config = train_config(size, horizon=horizon, remat=remat, token_weight=token_weight, lora=lora)
  start = time.perf_counter()
  report = compile_check.check(config, topology, per_device_batch=batch)
  report["wall_seconds"] = time.perf_counter() - start
  if lora:
    model = dict(config.model)
    report["lora"] = {k: model[k] for k in lora_lib.OPENPI_RANKS}
  return report


def largest_fitting(cells: list[dict[str, Any]]) -> dict[str, Any]:
  """Per (slice, H, loss, policy): the largest measured batch that fits, and whether a measured
  batch failed to fit (else the largest fitting one is only a lower bound)."""
  rows = {}
  for cell in cells:
    if "memory_per_device" not in cell:
      continue
    key = (cell["topology"], cell["action_horizon"], _loss(cell), cell["remat_policy"])
    row = rows.setdefault(key, {"largest_fitting": None, "smallest_not_fitting": None})
    batch = cell["per_device_batch"]
    if cell["fits"]:
      row["largest_fitting"] = max(row["largest_fitting"] or 0, batch)
    else:
      row["smallest_not_fitting"] = min(row["smallest_not_fitting"] or batch, batch)
  return rows


def markdown(results: dict[str, Any]) -> str:
  cells = sorted(results["cells"].values(), key=_order)
  rows = []
  for c in cells:
    if "memory_per_device" not in c:
      rows.append(
        [c["topology"], c["action_horizon"], _loss(c), c["remat_policy"], c["per_device_batch"]]
        + ["-"] * 7
        + [c.get("skipped", "not measured")]
      )
      continue
    m, f = c["memory_per_device"], c["flops"]
    corrected, analytic = f["compiled_corrected_per_device"], f["analytic_per_device"]
    rows.append(
      [
        c["topology"],
        c["action_horizon"],
        _loss(c),
        c["remat_policy"],
        c["per_device_batch"],
        m["total_gib"],
        m["temporaries_gib"],
        m["arguments_gib"],
        c["hbm_gib"],
        "yes" if c["fits"] else "NO",
        f["compiled_per_device"] / 1e12,
        corrected / 1e12,
        f"{corrected / analytic:.2f}",
      ]
    )
  versions = results.get("versions", {})
  table = results_writer.markdown_table(
    f"Full pi0.5-KI per TPU device, compiled by libtpu {versions.get('libtpu')} "
    f"(jax {versions.get('jax')}) on {results['device']}; 2 cameras, 200 prompt tokens",
    [
      "slice",
      "H",
      "loss",
      "remat",
      "batch/device",
      "total GiB",
      "temporaries GiB",
      "arguments GiB",
      "HBM GiB",
      "fits",
      "compiled TFLOP (scans once)",
      "corrected TFLOP",
      "corrected / analytic",
    ],
    rows,
  )
  fits = [
    [topology, horizon, loss, remat, r["largest_fitting"], r["smallest_not_fitting"]]
    for (topology, horizon, loss, remat), r in sorted(largest_fitting(cells).items())
  ]
  return (
    table
    + "\n\n"
    + results_writer.markdown_table(
      "Largest measured batch per device that fits",
      ["slice", "H", "loss", "remat", "largest fitting", "smallest measured not fitting"],
      fits,
    )
  )


def _loss(cell) -> str:
  return _objective(cell) + (", LoRA" if cell.get("lora") else "")


def _objective(cell) -> str:
  if cell["token_weight"] > 0:
    return "KI" if cell.get("knowledge_insulation", True) else "joint, no stop-gradient"
  if cell.get("knowledge_insulation", True):
    return "flow, VLM insulated (no VLM gradient)"
  return "flow only"


def _order(cell):
  return (
    cell["topology"],
    cell["action_horizon"],
    -cell["token_weight"],
    not cell.get("knowledge_insulation", True),
    bool(cell.get("lora")),
    cell["remat_policy"],
    cell["per_device_batch"],
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model on v5e-4 (tests)")
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--horizons", default=",".join(map(str, HORIZONS)))
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--token_weights", default=",".join(map(str, TOKEN_WEIGHTS)))
  parser.add_argument(
    "--lora", action="store_true", help="LoRA fine-tuning (openpi's ranks, base frozen)"
  )
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  topologies = [t for t in args.topologies.split(",") if t]
  horizons = [int(h) for h in args.horizons.split(",") if h]
  batches = sorted(int(b) for b in args.batches.split(",") if b)
  policies = [p for p in args.policies.split(",") if p]
  token_weights = [float(w) for w in args.token_weights.split(",") if w]
  size = "full"
  if args.quick:
    size, topologies, horizons, batches, policies, token_weights = (
      "tiny",
      ["v5e-4"],
      [0],
      [2],
      ["none"],
      [1.0],
    )
  for topology in topologies:
    compile_check.get_topology(topology)  # unknown names fail before any compile

  out_dir = args.out_dir or results_writer.RESULTS_DIR
  stem = "tpu_fit_quick" if args.quick else "tpu_fit"
  path = os.path.join(out_dir, f"{stem}.json")
  cells = {}
  if os.path.exists(path):
    with open(path) as f:
      # Keyed again: earlier files keyed cells without the insulation switch.
      cells = {cell_key(c): c for c in json.load(f).get("cells", {}).values()}
  results = {"size": size, "cells": cells}

  command = " ".join(
    ["python -m benchmarks.tpu_fit_bench", *(sys.argv[1:] if argv is None else argv)]
  )
  results["versions"] = {"jax": jax.__version__, "libtpu": compile_check.libtpu_version()}

  def save():
    results_writer.write("tpu_fit", dict(results), command=command, out_dir=out_dir, file_stem=stem)

  for topology in topologies:
    for horizon in horizons:
      for token_weight in token_weights:
        for remat in policies:
          over = None  # the first batch of this row that did not fit
          for batch in batches:
            if over is not None:
              cell = dict(
                topology=topology,
                action_horizon=horizon,
                token_weight=token_weight,
                knowledge_insulation=token_weight > 0,
                remat_policy=remat,
                per_device_batch=batch,
                skipped=f"not compiled: batch {over} already exceeds HBM",
              )
              if args.lora:
                cell["lora"] = dict(lora_lib.OPENPI_RANKS)
            else:
              cell = measure(size, topology, horizon, token_weight, remat, batch, lora=args.lora)
              cell["command"] = command
              if not cell["fits"]:
                over = batch
              print(compile_check.format_report(cell), flush=True)
            cells[cell_key(cell)] = cell
            save()
  results["quick"] = args.quick
  results["device"] = results_writer.describe_device(results_writer.device_info())
  print(markdown(results))
  print(f"\nWritten to {path}")
  return results


if __name__ == "__main__":
  main()
