r"""The KI ablation runner: pretrained VLM, arms and seeds, decoder latency, table and plots.

In order: the synthetic data (ki.data.synthetic_cache), the pretrained VLM, every arm and seed,
the latency of both decoders (ki.serve.latency), then the table and plots (ki.ablation.report).

  python -m ki.ablation --out=/tmp/ki_ablation [--size=smoke|medium] [--quick] [--seeds=0,1,2] \
    [--steps=N] [--eval_every=N] [--pretrain_steps=N] [--arms=a,b] [--mae_threshold=X] \
    [--cache=DIR] [--override=KEY=VALUE ...] [--compilation_cache=DIR] \
    [--experiment=experiments/ki_ablation.py]

What the arms are and how each is configured is the experiment file's business; this runner loads
it by path (--experiment, as ki.main loads --config), never by import, and reads from it:
  ARMS               {arm: {"knowledge_insulation", "token_loss", "cotrain", "label"}}, in order
  QUICK_ARMS         the arms of --quick
  SIZE_DEFAULTS      {size: {"steps", "eval_every"}}: the sizes it can run and their defaults
  PRETRAIN_STEPS     {size: VLM pretraining steps}
  COTRAIN_WEIGHT     recorded in results.json
  cache_dir(size)    $KI_CACHE/<size>: synthetic data and the pretrained VLM
  pretrain_workdir(size), pretrain_config(size, steps, overrides)
  arm_config(size, arm, *, init_path, seed, total_steps, eval_every, overrides)
The experiment file's docstring (experiments/ki_ablation.py) says what the ablation tests.

Outputs in --out: ablation.md (the table), curves.png, latency.png, results.json, runs/ (one
workdir per arm and seed; a finished run is reused when the command is repeated).
"""

import argparse
import ast
import importlib.util
import json
import logging
import os
import sys
import time

import jax
import ml_collections

from ki.ablation import report
from ki.data import synthetic_cache
from ki.model import pi05
from ki.serve import latency as latency_lib
from ki.train import trainer as trainer_lib

DEFAULT_EXPERIMENT = "experiments/ki_ablation.py"
COMMAND = "python -m ki.ablation"


def load_experiment(path: str):
  """The experiment file at `path` as a module, loaded by path like ki.main's --config."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No experiment file at {path!r} (run from the repository root?).")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains (or reuses) the pretrained VLM in `workdir`; returns that workdir."""
  trainer = trainer_lib.Trainer.from_config(config, workdir)
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
  trainer = RecordingTrainer.from_config(config, workdir)
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
      str(k): {n: v[n] for n in ("loss", "flow_mse", "token_ce") if n in v}
      for k, v in sorted(train_metrics.items())
    },
    "seconds": time.perf_counter() - start,
  }
  with open(done, "w") as f:
    json.dump(result, f)
  return result


def measure_latency(config: ml_collections.ConfigDict, size: str, *, repeats: int) -> dict:
  """sample_actions (10 Euler steps) against sample_fast (a typical DROID chunk's tokens) at
  batch 1, on the model the arms train, with freshly initialised parameters (the timing does not
  depend on their values)."""
  model = pi05.Config(**dict(config.model, remat_policy="none")).validate()  # no gradients
  params = jax.jit(lambda key: pi05.init_params(model, key))(jax.random.key(0))
  timings = latency_lib.measure(
    model,
    params,
    num_flow_steps=10,
    fast_tokens=latency_lib.TYPICAL_DROID_FAST_TOKENS,
    repeats=repeats,
  )
  return {"size": size, **timings}


def run(
  experiment,
  out: str,
  *,
  size: str,
  cache: str,
  arms,
  seeds,
  steps: int,
  eval_every: int,
  pretrain_steps: int,
  latency_repeats: int,
  mae_threshold: float | None,
  command: str,
  quick: bool = False,
  compilation_cache: str = "",
  overrides: dict | None = None,
) -> dict:
  """Everything for one size: data, pretrained VLM, every arm and seed, latency, table, plots.
  `experiment` is the loaded experiment file; `cache` is the root of the synthetic caches
  ($KI_CACHE): data and the pretrained VLM go to cache/<size>."""
  os.makedirs(out, exist_ok=True)
  os.environ["KI_CACHE"] = cache  # the synthetic configs read their paths from it
  overrides = overrides or {}
  # What every arm shares (data, model, batch), overrides included.
  shared = experiment.arm_config(size, arms[0], overrides=overrides)
  if size == "medium" and jax.default_backend() == "cpu":
    logging.warning(
      "--size=medium on a CPU: each training step takes seconds; this is the "
      "GPU mode (use --size=smoke on a CPU)."
    )
  synthetic_cache.ensure(shared)
  jax.config.update("jax_compilation_cache_dir", compilation_cache or shared.compilation_cache_dir)

  pretrained = pretrain(
    experiment.pretrain_config(size, pretrain_steps, overrides), experiment.pretrain_workdir(size)
  )
  results = {"arms": {arm: [] for arm in arms}}
  for seed in seeds:
    for arm in arms:
      config = experiment.arm_config(
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
  results["latency"] = measure_latency(shared, size, repeats=latency_repeats)
  results["setup"] = dict(
    command=command,
    device=report.describe_device(),
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
    cotrain_weight=experiment.COTRAIN_WEIGHT,
    quick=quick,
  )
  summary = report.summarise(results, mae_threshold)
  results["summary"] = summary
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(report.markdown(results, summary, experiment.ARMS))
  report.plot(results, out)
  return results


def main(argv=None):
  first = argparse.ArgumentParser(add_help=False)
  first.add_argument(
    "--experiment",
    default=DEFAULT_EXPERIMENT,
    help="the experiment file: the arms and their configs (default: %(default)s)",
  )
  known, _ = first.parse_known_args(argv)
  experiment = load_experiment(known.experiment)
  arm_names, size_defaults = list(experiment.ARMS), experiment.SIZE_DEFAULTS

  parser = argparse.ArgumentParser(
    prog=COMMAND, description=__doc__.split("\n")[0], parents=[first]
  )
  parser.add_argument("--out", required=True, help="folder for the table, plots and runs")
  parser.add_argument(
    "--size",
    default="smoke",
    choices=list(size_defaults),
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
    + ", ".join(f"{k} {v['steps']}" for k, v in size_defaults.items())
    + ")",
  )
  parser.add_argument("--eval_every", type=int, default=None, help="default: per size")
  parser.add_argument(
    "--pretrain_steps",
    type=int,
    default=None,
    help="VLM pretraining steps (default: experiments/vlm_pretrain.py's)",
  )
  parser.add_argument(
    "--arms", default=",".join(arm_names), help=f"subset of {','.join(arm_names)}"
  )
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
  unknown = sorted(set(arms) - set(arm_names))
  if unknown:
    parser.error(f"unknown arms {unknown}; choose from {arm_names}")
  size = args.size
  seeds = [int(s) for s in args.seeds.split(",") if s]
  steps = args.steps or size_defaults[size]["steps"]
  eval_every = args.eval_every or size_defaults[size]["eval_every"]
  pretrain_steps = args.pretrain_steps or experiment.PRETRAIN_STEPS[size]
  latency_repeats = 20
  if args.quick:
    arms, seeds, steps, eval_every, pretrain_steps = list(experiment.QUICK_ARMS), seeds[:1], 6, 3, 6
    latency_repeats = 3
  command = " ".join([COMMAND] + (sys.argv[1:] if argv is None else list(argv)))
  cache = args.cache or os.path.dirname(experiment.cache_dir(size))
  results = run(
    experiment,
    args.out,
    size=size,
    cache=cache,
    arms=arms,
    seeds=seeds,
    steps=steps,
    eval_every=eval_every,
    pretrain_steps=pretrain_steps,
    latency_repeats=latency_repeats,
    mae_threshold=args.mae_threshold,
    command=command,
    quick=args.quick,
    compilation_cache=args.compilation_cache,
    overrides=parse_overrides(args.override),
  )
  print(report.markdown(results, results["summary"], experiment.ARMS))
  return results
