r"""The KI ablation runner: pretrained VLM, arms and seeds, decoder latency, table and plots.

In order: the synthetic data (ki.data.synthetic_cache), the pretrained VLM, every arm and seed,
the latency of both decoders (ki.serve.latency), then the table and plots (ki.ablation.report).

  python -m ki.ablation --out=/tmp/ki_ablation [--size=smoke|medium] [--quick] [--seeds=0,1,2] \
    [--steps=N] [--eval_every=N] [--pretrain_steps=N] [--arms=a,b] [--mae_threshold=X] \
    [--cache=DIR] [--override=KEY=VALUE ...] [--compilation_cache=DIR] \
    [--experiment=experiments/ki_ablation.py]

What the arms are and how each is configured is the experiment file's business; this runner loads
it by path (--experiment, as ki.main loads --config), never by import, and reads from it:
  ARMS               {arm: {"knowledge_insulation", "flow_weight", "token_weight", "cotrain",
                     "stress", "decoder", "clip", "label"}}, in order
  COMPARISONS        the paired comparisons of the report, (arm A, arm B)
  QUICK_ARMS, QUICK_DATA, QUICK_PROBES   what --quick runs, on which data, with which held-out sets
  SIZE_DEFAULTS      {size: {"steps", "eval_every"}}: the sizes it can run and their defaults
  PRETRAIN_STEPS     {size: VLM pretraining steps}
  PROBES             {size: held-out set sizes}
  COTRAIN_WEIGHT, MIN_VQA_MARGIN   defaults of --cotrain_weight and --min_vqa_margin
  cache_dir(size), base_config(size, overrides), blind_manifest(manifest)
  pretrain_workdir(size, *, blind), pretrain_config(size, steps, overrides, *, blind)
  arm_config(size, arm, *, init_path, seed, total_steps, eval_every, cotrain_weight, overrides)
The experiment file's docstring (experiments/ki_ablation.py) says what the ablation tests.

Outputs in --out: ablation.md (the table), curves.png, following.png, latency.png, results.json,
runs/ (one workdir per arm and seed; a finished run is reused when the command is repeated).
"""

import argparse
import ast
import importlib.util
import itertools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ki import batch as batch_lib
from ki import checkpoint as checkpoint_lib
from ki.ablation import probes, report
from ki.data import droid, normalize, pipeline, synthetic_cache
from ki.model import params as params_lib
from ki.model import pi05
from ki.model import weights as weights_lib
from ki.serve import latency as latency_lib
from ki.train import setup as setup_lib
from ki.train import sharding as sharding_lib
from ki.train import state as state_lib
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


def write_blind_manifests(manifests, blind_name) -> None:
  """Next to each VQA manifest, its blind twin (named by `blind_name`, the experiment's
  blind_manifest): the same questions and answers, every image one blank grey frame."""
  for manifest in manifests:
    root = os.path.dirname(manifest)
    blank = os.path.join(root, "images", "blank.jpg")
    if not os.path.exists(blank):
      Image.fromarray(np.full(droid.IMAGE_SHAPE, 128, np.uint8)).save(blank, quality=90)
    blind = blind_name(manifest)
    if os.path.exists(blind):
      continue
    with open(manifest) as f, open(blind + ".tmp", "w") as g:
      for line in f:
        entry = json.loads(line)
        g.write(json.dumps(dict(entry, image="images/blank.jpg")) + "\n")
    os.replace(blind + ".tmp", blind)


# What a cached pretrained VLM must share with the pretraining asked for, besides its length
# (--pretrain_steps may grow it: the schedule's lengths and the checkpoint cadence follow it).
PRETRAIN_FIELDS = ("model", "optimizer", "batch_size", "seed")
_LENGTH_KEYS = ("decay_steps", "warmup_steps")


def check_pretrained(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, naming the settings, to reuse a pretrained VLM in `workdir` that was trained with
  other model, optimizer, batch or seed settings (e.g. an --override given this time only):
  resuming it would fail on the optimizer state, or quietly mix two pretrainings."""
  try:
    step_dir = checkpoint_lib.resolve_step_dir(workdir)
  except FileNotFoundError:
    return  # nothing trained yet
  saved, current = (
    trainer_lib.flat_config(ml_collections.ConfigDict(json.loads(text)))
    for text in ((step_dir / "assets" / "config.json").read_text(), config.to_json_best_effort())
  )
  changed = [
    f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
    for key in sorted(set(saved) | set(current))
    if key.split(".")[0] in PRETRAIN_FIELDS
    and key.rsplit(".", 1)[-1] not in _LENGTH_KEYS
    and saved.get(key) != current.get(key)
  ]
  if changed:
    raise ValueError(
      f"The pretrained VLM in {workdir} was trained with other settings:\n  "
      + "\n  ".join(changed)
      + "\nGive this run its own --cache (the data is generated again there), or drop the "
      "overrides that change the pretraining."
    )


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains (or reuses) a pretrained VLM in `workdir`; returns that workdir."""
  check_pretrained(config, workdir)
  trainer = trainer_lib.Trainer.from_config(config, workdir)
  trainer.run()  # nothing to do when the workdir already holds the finished pretraining
  trainer.close()
  return workdir


def load_params(workdir: str, model_config: pi05.Config):
  """A ki checkpoint's params as a device tree for `model_config`."""
  abstract = state_lib.abstract_params(model_config)
  loaded = weights_lib.load("ki", workdir, abstract)
  return params_lib.unflatten({k: jnp.asarray(v) for k, v in loaded.items()})


def materialize(
  config, model_config, tokenizer, norm_stats, *, split: str, count: int | None, batch_size: int
) -> list[batch_lib.Batch]:
  """`count` host batches of the pipeline's stream (every batch of one epoch when None): every
  arm of a seed trains on the same batches, and every evaluation reads the same frames."""
  iterator = pipeline.make_iterator(
    config.data,
    model_config,
    split=split,
    train=split == "train",
    per_host_batch_size=batch_size,
    tokenizer=tokenizer,
    norm_stats=norm_stats,
    seed=config.seed,
    process_index=0,
    process_count=1,
  )
  return list(itertools.islice(iterator, count))


TRAIN_KEYS = (
  "loss",
  "flow_mse",
  "token_ce",
  "grad_norm",
  "grad_norm/vlm",
  "grad_norm/action_expert",
  "update_norm/vlm",
  "update_norm/action_expert",
)


def run_arm(
  config, make_batches, probes_: probes.Probes, *, decoder: str, workdir: str, on_eval=None
) -> dict:
  """Trains one arm from the pretrained VLM (fresh expert from config.seed) on the host batches
  `make_batches()` returns (called only when the arm has to train),
  measuring at step 0, every config.eval.every steps and at the end. Returns {"eval": {step:
  scalars}, "train": {step: TRAIN_KEYS}, "seconds", "config"}; reuses workdir/ablation_run.json
  when it was trained with the same config, and trains again otherwise."""
  done = os.path.join(workdir, "ablation_run.json")
  fingerprint = config.to_json_best_effort(sort_keys=True)
  if os.path.exists(done):
    with open(done) as f:
      previous = json.load(f)
    if previous.get("config") == fingerprint:
      return previous
    logging.info("%s was trained with another config; training it again.", workdir)
  os.makedirs(workdir, exist_ok=True)
  batches = make_batches()
  start = time.perf_counter()
  setup = setup_lib.make_setup(config)
  state = setup.init_state(setup_lib.pretrained_weights(setup))
  reference_kv = probes_.reference_kv(state.params)
  insulation = setup.model_config.knowledge_insulation
  result = {"eval": {}, "train": {}, "seconds": 0.0, "config": fingerprint}

  def evaluate(step):
    scalars = probes_.measure(
      state.params,
      decoder=decoder,
      insulation=insulation,
      reference_kv=reference_kv,
      seed=config.seed,
    )
    result["eval"][str(step)] = scalars
    logging.info("step %d: %s", step, {k: round(v, 4) for k, v in scalars.items() if "/" not in k})
    if on_eval is not None:
      on_eval(result)

  evaluate(0)
  first = sharding_lib.global_batch(batches[0], setup.mesh)
  compiled = setup.compile(state, first)
  total = config.total_steps
  for step in range(1, total + 1):
    batch = first if step == 1 else sharding_lib.global_batch(batches[step - 1], setup.mesh)
    state, metrics = compiled(state, batch)
    metrics = jax.device_get(metrics)
    result["train"][str(step)] = {k: float(metrics[k]) for k in TRAIN_KEYS if k in metrics}
    if not np.isfinite(metrics["loss"]):
      raise trainer_lib.NonFiniteLossError(f"{workdir}: non-finite loss at step {step}.")
    if step % config.eval.every == 0 or step == total:
      evaluate(step)
  result["seconds"] = time.perf_counter() - start
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


class StoppedError(RuntimeError):
  """The experiment cannot test its claims (the pretrained VLM is no better than blind)."""


def _write(out: str, results: dict) -> None:
  path = os.path.join(out, "results.json")
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)


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
  command: str,
  quick: bool = False,
  compilation_cache: str = "",
  cotrain_weight: float | None = None,
  min_vqa_margin: float | None = None,
  overrides: dict | None = None,
) -> dict:
  """Everything for one size: data, pretrained and blind VLMs, every arm and seed, latency,
  table, plots. `experiment` is the loaded experiment file; `cache` is $KI_CACHE (data and the
  pretrained VLMs go to experiment.cache_dir(size))."""
  os.makedirs(out, exist_ok=True)
  # The synthetic configs read their paths from $KI_CACHE; --quick keeps its small dataset and
  # pretrained VLMs apart from the real ones.
  os.environ["KI_CACHE"] = os.path.join(cache, "quick") if quick else cache
  overrides = dict(experiment.QUICK_DATA if quick else {}, **(overrides or {}))
  cotrain_weight = experiment.COTRAIN_WEIGHT if cotrain_weight is None else cotrain_weight
  shared = experiment.arm_config(size, arms[0], overrides=overrides)
  if size != "smoke" and jax.default_backend() == "cpu":
    logging.warning("--size=%s on a CPU: this is the GPU mode (use --size=smoke on a CPU).", size)
  synthetic_cache.ensure(shared)
  manifests = [e["path"] for e in experiment.base_config(size, overrides).data.vlm_sources]
  write_blind_manifests(manifests + [shared.eval.vlm_heldout], experiment.blind_manifest)
  jax.config.update("jax_compilation_cache_dir", compilation_cache or shared.compilation_cache_dir)

  # Stage 1: the pretrained VLM and its blind twin, scored on the held-out questions.
  for blind in (False, True):
    pretrain(
      experiment.pretrain_config(size, pretrain_steps, overrides, blind=blind),
      experiment.pretrain_workdir(size, blind=blind),
    )
  model_config = pi05.Config(**shared.model, fast_loss=True).validate()
  tokenizer = trainer_lib.build_tokenizer(shared, model_config)
  norm_stats = normalize.load_norm_stats(shared.assets.norm_stats)
  limits = experiment.QUICK_PROBES if quick else experiment.PROBES[size]
  heldout = shared.eval.vlm_heldout
  robot_eval = materialize(
    shared, model_config, tokenizer, norm_stats, split="eval", count=None, batch_size=1
  )[: limits["robot_frames"]]
  probes_ = probes.Probes(
    model_config,
    tokenizer,
    norm_stats,
    robot_eval=robot_eval,
    vqa=probes.vqa_set(heldout, tokenizer, model_config, limit=limits["questions"]),
    blind_vqa=probes.vqa_set(
      experiment.blind_manifest(heldout), tokenizer, model_config, limit=limits["questions"]
    ),
    pairs=probes.language_pairs(limits["pairs"], tokenizer, norm_stats, model_config),
    delta_action_mask=tuple(shared.data.delta_action_mask) or None,
    batch_size=shared.eval.batch_size,
  )
  pretrained = experiment.pretrain_workdir(size)
  vlm = probes_.vqa_metrics(load_params(pretrained, model_config))
  blind = probes_.vqa_metrics(
    load_params(experiment.pretrain_workdir(size, blind=True), model_config), blind=True
  )
  margin = vlm["accuracy"] - blind["accuracy"]
  if min_vqa_margin is None:
    min_vqa_margin = experiment.MIN_VQA_MARGIN
  results = {
    "pretrain": {
      "vlm": vlm,
      "blind": blind,
      "margin": margin,
      "min_margin": experiment.MIN_VQA_MARGIN,
    },
    "setup": dict(
      command=command,
      device=report.describe_device(),
      size=size,
      overrides=overrides,
      model={
        k: shared.model[k]
        for k in ("vlm_variant", "expert_variant", "siglip_variant", "image_size")
      },
      seeds=list(seeds),
      steps=steps,
      eval_every=eval_every,
      pretrain_steps=pretrain_steps,
      batch_size=shared.batch_size,
      cotrain_weight=cotrain_weight,
      robot_eval_frames=probes_.num_robot,
      vqa_questions=len(probes_.vqa.answer),
      language_pairs=len(probes_.pairs.state) // 2,
      quick=quick,
    ),
    "arms": {arm: [] for arm in arms},
  }
  logging.info(
    "Pretrained VQA accuracy %.3f, blind %.3f (margin %.3f).",
    vlm["accuracy"],
    blind["accuracy"],
    margin,
  )
  if margin < min_vqa_margin and not quick:
    results["stopped"] = (
      f"The pretrained VLM beats the blind baseline by {margin:.3f} in candidate-restricted VQA "
      f"accuracy ({vlm['accuracy']:.3f} against {blind['accuracy']:.3f}), less than "
      f"{min_vqa_margin}: it has too little visual knowledge for the ablation to test "
      "whether robot training keeps it. Pretrain longer (--pretrain_steps) or on more images."
    )
    _write(out, results)
    raise StoppedError(results["stopped"])

  # Stage 2: the arms. Every arm of a seed trains on the same batches (one stream with
  # co-training examples, one without; flow-only ignores the FAST postfix it is given).
  for seed in seeds:
    streams = {}
    for arm in arms:
      config = experiment.arm_config(
        size,
        arm,
        init_path=pretrained,
        seed=seed,
        total_steps=steps,
        eval_every=eval_every,
        cotrain_weight=cotrain_weight,
        overrides=overrides,
      )
      runs = results["arms"][arm]

      def make_batches(config=config, streams=streams):
        cotrain = bool(config.data.vlm_sources)
        if cotrain not in streams:
          streams[cotrain] = materialize(
            config,
            model_config,
            tokenizer,
            norm_stats,
            split="train",
            count=steps,
            batch_size=config.batch_size,
          )
        return streams[cotrain]

      logging.info("Arm %s, seed %d.", arm, seed)

      def on_eval(partial, runs=runs, arm=arm):
        _write(out, dict(results, arms=dict(results["arms"], **{arm: runs + [partial]})))

      runs.append(
        run_arm(
          config,
          make_batches,
          probes_,
          decoder=experiment.ARMS[arm]["decoder"],
          workdir=os.path.join(out, "runs", arm, f"seed{seed}"),
          on_eval=on_eval,
        )
      )
      _write(out, results)
  results["latency"] = measure_latency(shared, size, repeats=latency_repeats)
  results["summary"] = report.summarise(results, experiment.COMPARISONS)
  _write(out, results)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(report.markdown(results, experiment.ARMS))
  report.plot(results, out, experiment.ARMS)
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
    help="smoke: the CPU model (VLM 128 wide, expert 64); medium: ~90M parameters (one GPU)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="minutes-long: 3 arms, 1 seed, a few steps (the test)"
  )
  parser.add_argument(
    "--seeds",
    default="0,1,2",
    help="comma-separated seeds (data order, flow noise, expert initialisation)",
  )
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
    "--pretrain_steps", type=int, default=None, help="VLM pretraining steps (default: per size)"
  )
  parser.add_argument(
    "--arms", default=",".join(arm_names), help=f"subset of {','.join(arm_names)}"
  )
  parser.add_argument(
    "--cotrain_weight",
    type=float,
    default=None,
    help=f"VLM examples per robot example in the co-training arms (default "
    f"{experiment.COTRAIN_WEIGHT})",
  )
  parser.add_argument(
    "--cache",
    default=None,
    help="root of the synthetic caches ($KI_CACHE; default: $KI_CACHE or ~/.cache/ki)",
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
    help="persistent XLA compilation cache (default: the size's cache folder/jax_cache)",
  )
  parser.add_argument(
    "--min_vqa_margin",
    type=float,
    default=None,
    help="stop unless the pretrained VLM beats the blind baseline by this much in VQA accuracy "
    f"(default {experiment.MIN_VQA_MARGIN}); a lower value is recorded in results.json",
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
  try:
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
      command=command,
      quick=args.quick,
      compilation_cache=args.compilation_cache,
      cotrain_weight=args.cotrain_weight,
      min_vqa_margin=args.min_vqa_margin,
      overrides=parse_overrides(args.override),
    )
  except StoppedError as stopped:
    print(f"Stopped: {stopped}", file=sys.stderr)
    raise SystemExit(3) from stopped
  print(report.markdown(results, experiment.ARMS))
  return results
