r"""The KI ablation: does insulation work? A small, reproducible replication of the paper's claims.

The KI paper (Driess et al. 2025) claims that with the stop-gradient and FAST co-training
  (1) the VLM keeps its language ability, where joint training without the stop-gradient
      degrades it;
  (2) the action expert learns faster than flow-only pi0.5 training;
  (3) inference stays as fast as a flow-only model, far faster than autoregressive FAST decoding.
This experiment tests each on synthetic DROID, with the tiny model of the smoke variant (CPU) or
the ~90M-parameter model of the medium variant (pi0.5's proportions scaled down; one GPU):
  stage 1  the pretrained VLM (experiments/vlm_pretrain.py: the VLM alone, next-token loss on the
           synthetic scene questions) stands in for PaliGemma;
  stage 2  from that checkpoint, the arms below train with identical data, seeds, steps and
           optimizer; they differ ONLY in model.knowledge_insulation, model.fast_loss /
           loss.fast_weight and data.vlm_sources (tests/experiments/test_ki_ablation.py checks it);
  stage 3  held-out evaluation along training (ki.train.evaluation): action error in raw units
           from sample_actions (10 Euler steps), FAST token accuracy, the VLM's held-out question
           loss (text_ce) and exact-match accuracy; steps to reach an action-error threshold; the
           latency of sample_actions against sample_fast (benchmarks/latency_bench.py).

Run everything (synthetic data, pretraining, arms, table and plots) on a CPU:
  python -m experiments.ki_ablation --out=/tmp/ki_ablation --seeds=0,1,2 --steps=150 \
    --eval_every=25      # ~20 min on a quiet 2-core CPU; the result is in docs/ablation/
  python -m experiments.ki_ablation --out=/tmp/ablation --quick   # minutes; what the test runs
and larger, on one GPU (480 synthetic episodes, 3,600 scene questions, batch 64, 3,000 steps per
arm after a 3,000-step VLM pretraining; the defaults of --size=medium):
  python -m experiments.ki_ablation --size=medium --out=/tmp/ki_ablation_medium
(on a GPU with less memory, e.g. --override=batch_size=32: --override=KEY=VALUE sets a config
field for the pretraining and every arm alike).
Outputs in --out: ablation.md (the table), curves.png, latency.png, results.json, runs/ (one
workdir per arm and seed; a finished run is reused when the command is repeated).

One arm alone, through the training entry point (variant "smoke", "medium" or "full", then
",<arm>"; the synthetic variants start from $KI_CACHE/<variant>/vlm_pretrain by default):
  python -m ki.main --config=experiments/ki_ablation.py:smoke,joint_cotrain --workdir=/tmp/joint
"""

import argparse
import ast
import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from experiments import droid_ki, vlm_pretrain
from ki.train import trainer as trainer_lib

# Each arm's switches; everything else is shared. Co-training only matters where a token loss
# trains the VLM, so flow-only pi0.5 has no co-training arm (its VLM examples would carry no loss).
ARMS = {
  "ki_cotrain": dict(
    knowledge_insulation=True,
    fast_loss=True,
    cotrain=True,
    label="KI (stop-grad + FAST + flow), co-training",
  ),
  "ki": dict(knowledge_insulation=True, fast_loss=True, cotrain=False, label="KI, no co-training"),
  "joint_cotrain": dict(
    knowledge_insulation=False,
    fast_loss=True,
    cotrain=True,
    label="joint, no stop-grad, co-training",
  ),
  "joint": dict(
    knowledge_insulation=False,
    fast_loss=True,
    cotrain=False,
    label="joint, no stop-grad, no co-training",
  ),
  "flow_only": dict(
    knowledge_insulation=False, fast_loss=False, cotrain=False, label="flow-only pi0.5"
  ),
}
# The only config fields the arms may differ in.
ARM_FIELDS = (
  "model.knowledge_insulation",
  "model.fast_loss",
  "loss.fast_weight",
  "data.vlm_sources",
)
QUICK_ARMS = ("ki_cotrain", "joint_cotrain")
# The sizes the runner trains (synthetic data, a pretrained VLM of its own) and their defaults.
SIZE_DEFAULTS = {
  "smoke": dict(steps=300, eval_every=50),
  "medium": dict(steps=3_000, eval_every=250),
}
COTRAIN_WEIGHT = 0.2  # VLM examples per robot example in the co-training arms (the smoke mixture)
# The metrics plotted and tabulated: (eval key, title, lower is better).
CURVES = (
  ("eval/robot/action_mae", "held-out action error (raw units, 10 flow steps)", True),
  ("eval/robot/fast_accuracy", "held-out FAST token accuracy", False),
  ("eval/vlm/text_ce", "VLM held-out question loss (language retention)", True),
  ("eval/vlm/text_exact_match", "VLM held-out exact-match answers", False),
)


def parse_overrides(items) -> dict:
  """["a.b=value", ...] -> {"a.b": value}; values are Python literals, or else strings."""
  overrides = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"Override {item!r} is not key=value (e.g. batch_size=32).")
    try:
      overrides[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      overrides[key] = text
  return overrides


def _fit_to_steps(config: ml_collections.ConfigDict, steps: int) -> None:
  """A short synthetic run: every schedule ends at `steps` (warm-up at most a tenth of it), and
  only the final checkpoint is kept."""
  config.total_steps = steps
  for group in config.optimizer.groups.values():
    group.decay_steps = steps
    group.warmup_steps = min(group.warmup_steps, max(steps // 10, 1))
  config.checkpoint.update(dict(every=steps, max_to_keep=1))


def arm_config(
  size: str,
  arm: str,
  *,
  init_path: str = "",
  seed: int = 0,
  total_steps: int | None = None,
  eval_every: int | None = None,
  overrides: dict | None = None,
) -> ml_collections.ConfigDict:
  """The config of one arm; `size` is droid_ki's variant ("smoke", "medium" or "full").
  `overrides` ({"a.b": value}) apply to every arm alike, before the ablation's own settings."""
  if arm not in ARMS:
    raise ValueError(f"Unknown ablation arm {arm!r}; choose from {sorted(ARMS)}.")
  switches = ARMS[arm]
  config = droid_ki.get_config(size)
  config.unlock()
  config.update_from_flattened_dict(overrides or {})
  config.seed = seed
  config.init.kind = "ki"
  synthetic = size in droid_ki.SYNTHETIC_DATA
  config.init.path = init_path or (
    os.path.join(droid_ki.cache_dir(size), "vlm_pretrain") if synthetic else ""
  )
  if total_steps is not None:
    config.total_steps = total_steps
  if synthetic:
    _fit_to_steps(config, config.total_steps)
    config.eval.max_batches = max(config.eval.max_batches, 128 // config.eval.batch_size)
  if eval_every is not None:
    config.eval.every = eval_every
  # Co-training data: the smoke variant's VLM manifest (any size: the path set on the command
  # line for full), or none.
  vlm_sources = tuple(dict(entry, weight=COTRAIN_WEIGHT) for entry in config.data.vlm_sources)
  config.data.vlm_sources = vlm_sources if switches["cotrain"] else ()
  config.model.knowledge_insulation = switches["knowledge_insulation"]
  config.model.fast_loss = switches["fast_loss"]
  config.loss.fast_weight = 1.0 if switches["fast_loss"] else 0.0
  config.lock()
  return config


def get_config(variant: str = "smoke") -> ml_collections.ConfigDict:
  """variant: "smoke", "medium" or "full", optionally ",<arm>" (default arm: ki_cotrain)."""
  size, _, arm = variant.partition(",")
  if size not in droid_ki.VARIANTS:
    raise ValueError(
      f"Unknown size {size!r} in variant {variant!r}; choose from {sorted(droid_ki.VARIANTS)}."
    )
  return arm_config(size, arm or "ki_cotrain")


# ----------------------------------------------------------------------------------------------
# Running the arms.


def _pretrain(size: str, steps: int, overrides: dict) -> str:
  """Trains (or reuses) the pretrained VLM in the size's cache/vlm_pretrain; returns that
  workdir."""
  workdir = os.path.join(droid_ki.cache_dir(size), "vlm_pretrain")
  config = vlm_pretrain.get_config(size)
  config.unlock()
  config.update_from_flattened_dict(overrides)
  _fit_to_steps(config, steps)
  # No eval here: every arm evaluates the pretrained VLM at its step 0.
  config.eval.every = 0
  config.lock()
  trainer = trainer_lib.Trainer(config, workdir)
  trainer.run()  # nothing to do when the workdir already holds the finished pretraining
  trainer.close()
  return workdir


class RecordingTrainer(trainer_lib.Trainer):
  """A Trainer that keeps every evaluation's scalars in eval_history {step: {name: value}}."""

  def __init__(self, *args, **kwargs):
    self.eval_history = {}
    super().__init__(*args, **kwargs)

  def evaluate(self, step):
    results = super().evaluate(step)
    self.eval_history[int(step)] = results
    return results


def run_arm(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains one arm (evaluating first at step 0) and returns {"eval": {step: scalars},
  "train": {step: scalars}, "seconds": wall time}; reuses workdir/ablation_run.json if there."""
  done = os.path.join(workdir, "ablation_run.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  start = time.perf_counter()
  trainer = RecordingTrainer(config, workdir)
  if trainer.start_step != 0:
    raise RuntimeError(
      f"{workdir} holds a half-finished run (step {trainer.start_step}); delete "
      "it so that every arm's curve starts from the pretrained VLM."
    )
  trainer.evaluate(0)
  train_metrics = trainer.run()
  trainer.close()
  result = {
    "eval": {str(k): v for k, v in sorted(trainer.eval_history.items())},
    "train": {
      str(k): {n: v[n] for n in ("loss", "flow_mse", "fast_ce") if n in v}
      for k, v in sorted(train_metrics.items())
    },
    "seconds": time.perf_counter() - start,
  }
  with open(done, "w") as f:
    json.dump(result, f)
  return result


# ----------------------------------------------------------------------------------------------
# Summaries: table and plots.


def _series(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """Eval steps [T] and values [seeds, T] of `key` (NaN where a run lacks it)."""
  steps = sorted({int(s) for run in runs for s in run["eval"]})
  values = np.array(
    [[run["eval"].get(str(s), {}).get(key, np.nan) for s in steps] for run in runs],
    dtype=np.float64,
  )
  return np.array(steps), values


def steps_to_threshold(steps: np.ndarray, mae: np.ndarray, threshold: float) -> list[float]:
  """Per seed, the first eval step with action error <= threshold (NaN if never). mae: [S, T]."""
  reached = []
  for row in mae:
    hits = np.nonzero(row <= threshold)[0]
    reached.append(float(steps[hits[0]]) if len(hits) else np.nan)
  return reached


def _mean_spread(values) -> str:
  values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
  if not len(values):
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3g}"
  return f"{values.mean():.3g} ± {values.std():.2g}"


def summarise(results: dict, mae_threshold: float | None) -> dict:
  """Per arm: final values, steps to threshold; the threshold used."""
  arms = results["arms"]
  final_mae = [
    float(np.nanmax(_series(runs, "eval/robot/action_mae")[1][:, -1])) for runs in arms.values()
  ]
  # Default rule: the worst final error of any run, so every run reaches it and the steps compare.
  threshold = mae_threshold if mae_threshold is not None else max(final_mae)
  summary = {
    "mae_threshold": threshold,
    "threshold_rule": (
      "given (--mae_threshold)"
      if mae_threshold is not None
      else "the largest final action error of any arm and seed"
    ),
  }
  for arm, runs in arms.items():
    row = {}
    for key, _, _ in CURVES:
      steps, values = _series(runs, key)
      row[key] = {"start": values[:, 0].tolist(), "final": values[:, -1].tolist()}
    steps, mae = _series(runs, "eval/robot/action_mae")
    row["steps_to_threshold"] = steps_to_threshold(steps, mae, threshold)
    summary[arm] = row
  return summary


def _describe_model(setup: dict) -> str:
  model = setup["model"]
  return (
    f"Gemma {model['vlm_variant']} VLM + {model['expert_variant']} expert, SigLIP "
    f"{model['siglip_variant']} at {model['image_size']} px"
  )


def markdown(results: dict, summary: dict) -> str:
  setup = results["setup"]
  lines = [
    "# KI ablation",
    "",
    f"Command: `{setup['command']}`  ",
    f"Machine: {setup['device']}; size {setup['size']} "
    f"({_describe_model(setup)}); seeds {setup['seeds']}; {setup['steps']} steps per arm, batch "
    f"{setup['batch_size']}; VLM pretrained for {setup['pretrain_steps']} steps.  ",
    "Values are mean ± std over seeds (start = step 0, the pretrained VLM; final = last step). "
    f"Steps to action error <= {summary['mae_threshold']:.3g} ({summary['threshold_rule']}); "
    "(k/n) = seeds that reached it; '-' = not measured (flow-only has no FAST postfix).",
    "",
    "| arm | stop-grad | FAST loss | co-train | action MAE final | steps to threshold | "
    "FAST acc final | text CE start → final | exact match start → final |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for arm in results["arms"]:
    switches, row = ARMS[arm], summary[arm]
    text_ce, exact = row["eval/vlm/text_ce"], row["eval/vlm/text_exact_match"]
    reached = int(np.sum(np.isfinite(row["steps_to_threshold"])))
    lines.append(
      f"| {arm} | {'yes' if switches['knowledge_insulation'] else 'no'} | "
      f"{'yes' if switches['fast_loss'] else 'no'} | {'yes' if switches['cotrain'] else 'no'} | "
      f"{_mean_spread(row['eval/robot/action_mae']['final'])} | "
      f"{_mean_spread(row['steps_to_threshold'])} ({reached}/{len(row['steps_to_threshold'])}) | "
      f"{_mean_spread(row['eval/robot/fast_accuracy']['final'])} | "
      f"{_mean_spread(text_ce['start'])} → {_mean_spread(text_ce['final'])} | "
      f"{_mean_spread(exact['start'])} → {_mean_spread(exact['final'])} |"
    )
  latency = results["latency"]
  lines += [
    "",
    f"Inference latency ({latency['size']} model, batch 1, median of {latency['repeats']}): "
    f"sample_actions ({latency['num_flow_steps']} Euler steps) {latency['flow']['median_ms']:.3g}"
    f" ms, sample_fast ({latency['fast_tokens']} tokens) {latency['fast']['median_ms']:.3g} ms "
    f"— FAST decoding is {latency['fast_over_flow']:.1f}x slower.",
    "",
    "![curves](curves.png) ![latency](latency.png)",
    "",
  ]
  return "\n".join(lines)


def plot(results: dict, out: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(2, 2, figsize=(12, 8))
  for axis, (key, title, _) in zip(axes.flat, CURVES):
    for arm, runs in results["arms"].items():
      steps, values = _series(runs, key)
      if np.all(np.isnan(values)):
        continue
      mean = np.nanmean(values, axis=0)
      (line,) = axis.plot(steps, mean, marker="o", markersize=3, label=arm)
      if len(runs) > 1:
        axis.fill_between(
          steps,
          np.nanmin(values, axis=0),
          np.nanmax(values, axis=0),
          color=line.get_color(),
          alpha=0.15,
        )
    if key == "eval/robot/action_mae" and "summary" in results:
      axis.axhline(
        results["summary"]["mae_threshold"],
        color="gray",
        linestyle="--",
        linewidth=1,
        label="steps-to-threshold level",
      )
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("training step")
    axis.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  setup = results["setup"]
  figure.suptitle(
    f"KI ablation: mean over seeds {setup['seeds']} (band: min-max), {setup['device']}", fontsize=11
  )
  figure.tight_layout()
  curves = os.path.join(out, "curves.png")
  figure.savefig(curves, dpi=90)
  plt.close(figure)

  latency = results["latency"]
  figure, axis = plt.subplots(figsize=(5, 3.5))
  names = [
    f"sample_actions\n({latency['num_flow_steps']} flow steps)",
    f"sample_fast\n({latency['fast_tokens']} tokens)",
  ]
  axis.bar(
    names,
    [latency["flow"]["median_ms"], latency["fast"]["median_ms"]],
    color=["tab:blue", "tab:orange"],
  )
  axis.set_ylabel("median ms per chunk (batch 1)")
  axis.set_title(f"inference, {latency['size']} model, {setup['device']}", fontsize=10)
  figure.tight_layout()
  latency_path = os.path.join(out, "latency.png")
  figure.savefig(latency_path, dpi=90)
  plt.close(figure)
  return [curves, latency_path]


# ----------------------------------------------------------------------------------------------
# The command.


def run(
  out: str,
  *,
  size: str,
  cache: str,
  arms,
  seeds,
  steps: int,
  eval_every: int,
  pretrain_steps: int,
  latency_size: str,
  latency_repeats: int,
  mae_threshold: float | None,
  command: str,
  quick: bool = False,
  compilation_cache: str = "",
  overrides: dict | None = None,
) -> dict:
  """Everything for one size: data, pretrained VLM, every arm and seed, latency, table, plots.
  `cache` is the root of the synthetic caches ($KI_CACHE): data and the pretrained VLM go to
  cache/<size>."""
  from benchmarks import (
    latency_bench,  # pylint: disable=g-import-not-at-top
    results_writer,  # pylint: disable=g-import-not-at-top
  )
  from ki.train import demo_data  # pylint: disable=g-import-not-at-top

  os.makedirs(out, exist_ok=True)
  os.environ["KI_CACHE"] = cache  # the synthetic configs read their paths from it
  overrides = overrides or {}
  # What every arm shares (data, model, batch), overrides included.
  shared = arm_config(size, arms[0], overrides=overrides)
  if size == "medium" and not results_writer.has_accelerator():
    logging.warning(
      "--size=medium on a CPU: each training step takes seconds; this is the "
      "GPU mode (use --size=smoke on a CPU)."
    )
  demo_data.ensure(shared)
  jax.config.update("jax_compilation_cache_dir", compilation_cache or shared.compilation_cache_dir)

  pretrained = _pretrain(size, pretrain_steps, overrides)
  results = {"arms": {arm: [] for arm in arms}}
  for seed in seeds:
    for arm in arms:
      config = arm_config(
        size,
        arm,
        init_path=pretrained,
        seed=seed,
        total_steps=steps,
        eval_every=eval_every,
        overrides=overrides,
      )
      if quick:
        config.unlock()
        config.eval.max_batches = 1
        config.lock()
      logging.info("Arm %s, seed %d.", arm, seed)
      results["arms"][arm].append(run_arm(config, os.path.join(out, "runs", arm, f"seed{seed}")))
  results["latency"] = latency_bench.run(
    latency_size,
    num_flow_steps=10,
    fast_tokens=latency_bench.TYPICAL_DROID_FAST_TOKENS,
    repeats=latency_repeats,
  )
  results["setup"] = dict(
    command=command,
    device=results_writer.describe_device(results_writer.device_info()),
    size=size,
    overrides=overrides,
    model={
      k: shared.model[k] for k in ("vlm_variant", "expert_variant", "siglip_variant", "image_size")
    },
    seeds=list(seeds),
    steps=steps,
    eval_every=eval_every,
    pretrain_steps=pretrain_steps,
    batch_size=shared.batch_size,
    cotrain_weight=COTRAIN_WEIGHT,
    quick=quick,
  )
  summary = summarise(results, mae_threshold)
  results["summary"] = summary
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(markdown(results, summary))
  plot(results, out)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for the table, plots and runs")
  parser.add_argument(
    "--size",
    default="smoke",
    choices=list(SIZE_DEFAULTS),
    help="smoke: the tiny model (CPU); medium: ~90M parameters (one GPU)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="minutes-long: 2 arms, 1 seed, a few steps (the test)"
  )
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated data/noise seeds")
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="training steps per arm (default: per size, "
    + ", ".join(f"{k} {v['steps']}" for k, v in SIZE_DEFAULTS.items())
    + ")",
  )
  parser.add_argument("--eval_every", type=int, default=None, help="default: per size")
  parser.add_argument(
    "--pretrain_steps",
    type=int,
    default=None,
    help="VLM pretraining steps (default: experiments/vlm_pretrain.py's)",
  )
  parser.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
  parser.add_argument(
    "--mae_threshold",
    type=float,
    default=None,
    help="action error for steps-to-threshold (default: the worst arm's final)",
  )
  parser.add_argument(
    "--cache",
    default=None,
    help="root of the synthetic caches; data and the pretrained VLM go to "
    "CACHE/<size> (default: $KI_CACHE or ~/.cache/ki)",
  )
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="a config setting for the pretraining and every arm alike, e.g. "
    "--override=batch_size=32 on a smaller GPU (repeatable)",
  )
  parser.add_argument(
    "--compilation_cache",
    default="",
    help="persistent XLA compilation cache (default: CACHE/<size>/jax_cache)",
  )
  args = parser.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
  size = args.size
  seeds = [int(s) for s in args.seeds.split(",") if s]
  steps = args.steps or SIZE_DEFAULTS[size]["steps"]
  eval_every = args.eval_every or SIZE_DEFAULTS[size]["eval_every"]
  pretrain_steps = args.pretrain_steps or vlm_pretrain.STEPS[size]
  latency_size, latency_repeats = size, 20
  if args.quick:
    arms, seeds, steps, eval_every, pretrain_steps = list(QUICK_ARMS), seeds[:1], 6, 3, 6
    latency_size, latency_repeats = "tiny", 3
  command = " ".join(
    ["python -m experiments.ki_ablation"] + (sys.argv[1:] if argv is None else list(argv))
  )
  cache = args.cache or os.path.dirname(droid_ki.cache_dir(size))
  results = run(
    args.out,
    size=size,
    cache=cache,
    arms=arms,
    seeds=seeds,
    steps=steps,
    eval_every=eval_every,
    pretrain_steps=pretrain_steps,
    latency_size=latency_size,
    latency_repeats=latency_repeats,
    mae_threshold=args.mae_threshold,
    command=command,
    quick=args.quick,
    compilation_cache=args.compilation_cache,
    overrides=parse_overrides(args.override),
  )
  print(markdown(results, results["summary"]))
  return results


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)
  main()
