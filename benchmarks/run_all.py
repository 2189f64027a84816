r"""Every benchmark, one after the other: `make bench` runs this.

  python -m benchmarks.run_all          # quick mode: small models, a few steps (any machine)
  python -m benchmarks.run_all --full   # the real sizes (train/memory/latency need a GPU)

Runs, when present: train_bench, memory_bench, latency_bench, data_bench, tokenizer_bench. Each
writes its JSON into benchmarks/results/ and prints its markdown table; the tables are also
collected into benchmarks/results/summary.md (summary_quick.md in quick mode). In --full mode on
a machine without an accelerator, the benchmarks that need one are skipped with a note instead of
measuring a CPU at sizes it cannot train.
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import sys
import traceback

from benchmarks import results_writer

# (module, needs an accelerator in --full mode, quick-mode arguments). Quick runs do not overwrite
# the committed full-mode results: with --quick, results_writer.publish writes <name>_quick.json.
BENCHMARKS = (
  ("train_bench", False, ["--quick"]),  # on a CPU, --full measures the sizes a CPU can hold
  ("memory_bench", True, ["--quick"]),
  ("latency_bench", True, ["--quick"]),
  ("data_bench", False, ["--quick"]),
  ("lerobot_bench", False, ["--quick"]),
  ("tokenizer_bench", False, ["--quick"]),
)


def plan(full: bool, *, accelerator: bool) -> list[tuple[str, list[str] | None]]:
  """[(module, argv)] in run order; argv None means skipped on this machine."""
  steps = []
  for module, needs_accelerator, quick_argv in BENCHMARKS:
    if importlib.util.find_spec(f"benchmarks.{module}") is None:
      continue  # written by another part of the project; not here yet
    if not full:
      steps.append((module, list(quick_argv)))
    elif needs_accelerator and not accelerator:
      steps.append((module, None))
    else:
      steps.append((module, []))
  return steps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--full", action="store_true", help="real sizes instead of quick mode")
  args = parser.parse_args(argv)
  sections, failures = [], []
  for module, module_argv in plan(args.full, accelerator=results_writer.has_accelerator()):
    if module_argv is None:
      sections.append(f"## {module}\n\nskipped: needs an accelerator for --full.")
      print(sections[-1], flush=True)
      continue
    print(f"## {module} {' '.join(module_argv)}", flush=True)
    output = io.StringIO()
    try:
      with contextlib.redirect_stdout(output):
        importlib.import_module(f"benchmarks.{module}").main(module_argv)
    except Exception:  # one broken benchmark must not hide the others' numbers
      failures.append(module)
      output.write(f"\nFAILED:\n{traceback.format_exc()}")
    print(output.getvalue(), flush=True)
    sections.append(f"## {module} {' '.join(module_argv)}\n\n{output.getvalue().strip()}")
  name = "summary.md" if args.full else "summary_quick.md"
  os.makedirs(results_writer.RESULTS_DIR, exist_ok=True)
  with open(os.path.join(results_writer.RESULTS_DIR, name), "w") as f:
    f.write("\n\n".join(sections) + "\n")
  if failures:
    print(f"Failed: {', '.join(failures)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
