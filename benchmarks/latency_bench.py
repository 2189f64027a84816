r"""Inference latency: flow decoding (sample_actions) against FAST decoding (sample_fast).

  python -m benchmarks.latency_bench           # full pi0.5-KI on the accelerator, batch 1
  python -m benchmarks.latency_bench --quick   # the tiny model on a CPU (tests)
  python -m benchmarks.latency_bench --size=medium   # the ~90M model (pi0.5's proportions), CPU ok

Same model, same parameters, same observation (two 224x224 cameras and a pi0.5 prompt, no FAST
postfix), batch 1 as a robot queries it:
  prefix the cameras and the prompt once through SigLIP and the VLM into a KV cache (both
         decoders start with it; the table also shows each decoder's time beyond it);
  flow  sample_actions: the prefix once into a KV cache, then 10 Euler steps of the action expert;
  fast  sample_fast: the same prefix, then greedy autoregressive decoding of `--fast_tokens` tokens
        (a typical DROID chunk is ~30 FAST tokens, plus "|" and EOS: 32 by default).
Each is jitted and compiled first; the reported time is the median (and 90th percentile) of
`--repeats` calls, each ending when the result is on the host (ki.serve.latency.measure). The KI
paper reports ~100 ms (flow) against ~750 ms (pi0-FAST) per chunk on an RTX 4090, a ratio of ~7.5.

Writes benchmarks/results/latency_<size>.json (latency_tiny_quick.json with --quick) and prints a
markdown table.
"""

import argparse
from typing import Any

import jax

from benchmarks import fake_model, results_writer, train_bench
from ki.serve import latency

TYPICAL_DROID_FAST_TOKENS = latency.TYPICAL_DROID_FAST_TOKENS
# Inference at batch 1 is cheap enough on a CPU up to the ~90M-parameter medium model.
CPU_SIZES = train_bench.CPU_SIZES + ("medium",)


def run(size: str, *, num_flow_steps: int, fast_tokens: int, repeats: int) -> dict[str, Any]:
  config = train_bench.model_config(size, remat_policy="none")  # no gradients at inference
  params = fake_model.random_params(
    config, shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0])
  )
  timings = latency.measure(
    config, params, num_flow_steps=num_flow_steps, fast_tokens=fast_tokens, repeats=repeats
  )
  return {"size": size, **timings}


def markdown(results: dict[str, Any]) -> str:
  prefix = results["prefix"]["median_ms"]
  rows = [
    [
      f"prefix only ({results['image_tokens']} image + {results['prompt_tokens']} prompt tokens "
      "into the KV cache)",
      prefix,
      results["prefix"]["p90_ms"],
      0.0,
    ],
    [
      f"sample_actions ({results['num_flow_steps']} Euler steps, H={results['action_horizon']})",
      results["flow"]["median_ms"],
      results["flow"]["p90_ms"],
      results["flow"]["median_ms"] - prefix,
    ],
    [
      f"sample_fast ({results['fast_tokens']} tokens)",
      results["fast"]["median_ms"],
      results["fast"]["p90_ms"],
      results["fast"]["median_ms"] - prefix,
    ],
  ]
  return results_writer.markdown_table(
    f"Inference latency, {results['size']} model, batch 1, on {results['device']} "
    f"(FAST / flow = {results['fast_over_flow']:.1f}x)",
    ["decoding", "median ms", "p90 ms", "median ms after the prefix"],
    rows,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (CPU, tests)")
  parser.add_argument("--size", default="full", choices=list(train_bench.SIZES))
  parser.add_argument("--num_flow_steps", type=int, default=10)
  parser.add_argument("--fast_tokens", type=int, default=TYPICAL_DROID_FAST_TOKENS)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  size, repeats = args.size, args.repeats
  if args.quick:
    size, repeats = "tiny", 3
  elif size not in CPU_SIZES and not results_writer.has_accelerator():
    parser.error(
      f"--size={size} needs an accelerator; on a CPU use --quick or --size in "
      f"{', '.join(CPU_SIZES)}"
    )
  results = run(
    size, num_flow_steps=args.num_flow_steps, fast_tokens=args.fast_tokens, repeats=repeats
  )
  return results_writer.publish(
    "latency",
    results,
    variant=size,
    quick=args.quick,
    argv=argv,
    out_dir=args.out_dir,
    table=markdown,
  )


if __name__ == "__main__":
  main()
