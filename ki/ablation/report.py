"""The KI ablation's summary: speed (steps to 50% / 80% of the way to the best final action
error, area under the curve), final knowledge and language following, paired differences
across seeds with bootstrap intervals; the Markdown table (ablation.md) and the plots.

`results` is what ki.ablation.runner collects: {"pretrain": {vlm, blind, margin}, "arms": {arm:
[run per seed]}, "latency", "setup"}, each run {"eval": {step: {metric: value}}, "train": {step:
{metric: value}}, "seconds"}.
"""

import os
import platform

import jax
import numpy as np

# (eval key, title, lower is better) of the curves and the final-value table.
CURVES = (
  ("action_mae", "held-out action error (raw units; where the chunks decode)", True),
  ("vqa/accuracy", "VQA accuracy (candidate-restricted)", False),
  ("vqa/ce_no_fast", "answer loss, FAST ids excluded", True),
  ("follow_rate", "language following (chance 0.5)", False),
  ("kv_drift", "VLM K/V drift from the pretrained VLM", True),
  ("grad_vlm/flow", "flow-loss gradient norm in the VLM", True),
)
FINAL = (
  "action_mae",
  "vqa/accuracy",
  "vqa/ce_no_fast",
  "vqa/fast_mass",
  "follow_rate",
  "kv_drift",
  "grad_vlm/flow",
  "grad_cos/flow_vqa",
  "grad_cos/fast_vqa",
  "adarms_gate_rms",
  "fast_accuracy",
  "fast_decode_failures",
)
# The paired comparisons' metrics: (name, lower is better).
COMPARED = (
  ("auc", True),
  ("steps_to_80", True),
  ("final/action_mae", True),
  ("final/vqa/accuracy", False),
  ("final/follow_rate", False),
  ("final/kv_drift", True),
)
BOOTSTRAP_SAMPLES = 10_000


def describe_device() -> str:
  """'CPU, N cores (machine)' or 'Nx <accelerator kind>': where the numbers came from."""
  if jax.default_backend() == "cpu":
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"
  devices = jax.devices()
  return f"{len(devices)}x {devices[0].device_kind}"


def series(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """Eval steps [T] and values [seeds, T] of `key` (NaN where a run lacks it)."""
  steps = sorted({int(s) for run in runs for s in run["eval"]})
  values = np.array(
    [[run["eval"].get(str(s), {}).get(key, np.nan) for s in steps] for run in runs],
    dtype=np.float64,
  )
  return np.array(steps), values


def acting_error(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Eval steps [T] and held-out action error [seeds, T], NaN where most FAST chunks did not
  decode: there the error is the zero chunk's (the median action), not a policy's."""
  steps, error = series(runs, "action_mae")
  failures = np.nan_to_num(series(runs, "fast_decode_failures")[1])
  return steps, np.where(failures > 0.5, np.nan, error)


def steps_to_fraction(steps: np.ndarray, error: np.ndarray, target: float) -> float:
  """The first step at which `error` [T] reaches `target` or below, linearly interpolated
  between evaluations; NaN if it never does."""
  if error[0] <= target:
    return float(steps[0])
  for i in range(1, len(steps)):
    if error[i] <= target:
      previous = error[i - 1]
      share = (previous - target) / max(previous - error[i], 1e-12)
      return float(steps[i - 1] + share * (steps[i] - steps[i - 1]))
  return float("nan")


def auc(steps: np.ndarray, error: np.ndarray) -> float:
  """Mean action error over training: the trapezoid area under the curve / the steps."""
  return float(np.trapezoid(error, steps) / (steps[-1] - steps[0]))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, seed: int = 0) -> dict:
  """Mean of a - b (paired by seed), its 95% bootstrap interval over seeds, and how many seeds
  agree in sign with the mean."""
  difference = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  difference = difference[np.isfinite(difference)]
  if len(difference) == 0:
    return {
      "mean": float("nan"),
      "low": float("nan"),
      "high": float("nan"),
      "same_sign": 0,
      "seeds": 0,
    }
  rng = np.random.default_rng(seed)
  samples = rng.choice(difference, size=(BOOTSTRAP_SAMPLES, len(difference))).mean(axis=1)
  mean = float(difference.mean())
  return {
    "mean": mean,
    "low": float(np.percentile(samples, 2.5)),
    "high": float(np.percentile(samples, 97.5)),
    "same_sign": int(np.sum(np.sign(difference) == np.sign(mean))),
    "seeds": len(difference),
  }


def summarise(results: dict, comparisons) -> dict:
  """Per arm and seed: speed and final values; per comparison (arm A, arm B): paired
  differences A - B with bootstrap intervals."""
  arms = results["arms"]
  # The common target: the best final action error of any run whose policy acts.
  finals = [acting_error(runs)[1][:, -1] for runs in arms.values() if runs]
  best = float(np.nanmin(np.concatenate(finals)))
  summary = {"best_final_action_mae": best, "arms": {}, "comparisons": {}}
  # Per seed, the common starting error: the worst step-0 error of that seed's arms (a fresh
  # expert; a FAST-decoded arm whose tokens do not decode yet predicts zeros instead).
  starts = np.nanmax(
    np.array([series(runs, "action_mae")[1][:, 0] for runs in arms.values() if runs]), axis=0
  )
  summary["start_action_mae"] = starts.tolist()
  for arm, runs in arms.items():
    if not runs:
      continue
    steps, error = acting_error(runs)  # no speed is credited for the zero chunk
    row = {
      "steps_to_50": [
        steps_to_fraction(steps, e, e0 - 0.5 * (e0 - best)) for e, e0 in zip(error, starts)
      ],
      "steps_to_80": [
        steps_to_fraction(steps, e, e0 - 0.8 * (e0 - best)) for e, e0 in zip(error, starts)
      ],
      "auc": [auc(steps, e) for e in error],
      "seconds": [run["seconds"] for run in runs],
    }
    for key in FINAL:
      values = series(runs, key)[1]
      row[f"start/{key}"] = values[:, 0].tolist()
      row[f"final/{key}"] = values[:, -1].tolist()
    update = [
      float(np.mean([m.get("update_norm/vlm", np.nan) for m in run["train"].values()]))
      for run in runs
    ]
    row["mean_update_norm/vlm"] = update
    summary["arms"][arm] = row
  for a, b in comparisons:
    if a not in summary["arms"] or b not in summary["arms"]:
      continue
    summary["comparisons"][f"{a} - {b}"] = {
      name: paired_bootstrap(summary["arms"][a][name], summary["arms"][b][name])
      for name, _ in COMPARED
    }
  return summary


def _mean_spread(values, digits: int = 3) -> str:
  values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
  if not len(values):
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}g}"
  return f"{values.mean():.{digits}g} ± {values.std():.2g}"


def _describe_model(setup: dict) -> str:
  model = setup["model"]
  return (
    f"Gemma {model['vlm_variant']} VLM + {model['expert_variant']} expert, SigLIP "
    f"{model['siglip_variant']} at {model['image_size']} px"
  )


def markdown(results: dict, arm_switches: dict) -> str:
  """ablation.md: setup, stage 1, the arms' table, the paired comparisons, latency."""
  setup, summary, pretrain = results["setup"], results["summary"], results["pretrain"]
  lines = [
    "# KI ablation",
    "",
    f"Command: `{setup['command']}`  ",
    f"Machine: {setup['device']}; size {setup['size']} ({_describe_model(setup)}); seeds "
    f"{setup['seeds']}; {setup['steps']} steps per arm at batch {setup['batch_size']}, evaluated "
    f"every {setup['eval_every']}; co-training weight {setup['cotrain_weight']}; VLM pretrained "
    f"for {setup['pretrain_steps']} steps.  ",
    f"Held out: {setup['robot_eval_frames']} robot frames, {setup['vqa_questions']} scene "
    f"questions, {setup['language_pairs']} counterfactual instruction pairs.",
    "",
    "## Stage 1: the pretrained VLM against the blind baseline",
    "",
    "| | VQA accuracy | answer CE | "
    + " | ".join(k.split("/", 1)[1] for k in pretrain["vlm"] if k.startswith("accuracy/"))
    + " |",
    "|---|---|---|" + "---|" * sum(k.startswith("accuracy/") for k in pretrain["vlm"]),
  ]
  for name, label in (("vlm", "pretrained VLM"), ("blind", "blind (blank images)")):
    values = pretrain[name]
    lines.append(
      f"| {label} | {values['accuracy']:.3f} | {values['ce_no_fast']:.3f} | "
      + " | ".join(f"{v:.2f}" for k, v in values.items() if k.startswith("accuracy/"))
      + " |"
    )
  lines += [
    "",
    f"Margin {pretrain['margin']:.3f} (required: {pretrain['min_margin']}).",
    "",
    "## Stage 2: the arms (mean ± std over seeds; start = step 0, final = last step)",
    "",
    "| arm | stop-grad | flow w | token w | co-train | stress | clip | action MAE final | steps to "
    "50% | steps to 80% | AUC | VQA acc final | answer CE (no FAST) final | FAST mass final | "
    "following final | K/V drift final | flow grad in VLM | VLM update norm (mean) | FAST "
    "undecodable final |",
    "|---" * 19 + "|",
  ]
  for arm, row in summary["arms"].items():
    s = arm_switches[arm]
    lines.append(
      f"| {arm} | {'yes' if s['knowledge_insulation'] else 'no'} | {s['flow_weight']:g} | "
      f"{s['token_weight']:g} | {'yes' if s['cotrain'] else 'no'} | "
      f"{'yes' if s['stress'] else 'no'} | {s['clip']} | "
      f"{_mean_spread(row['final/action_mae'])} | {_mean_spread(row['steps_to_50'])} | "
      f"{_mean_spread(row['steps_to_80'])} | {_mean_spread(row['auc'])} | "
      f"{_mean_spread(row['final/vqa/accuracy'])} | {_mean_spread(row['final/vqa/ce_no_fast'])} | "
      f"{_mean_spread(row['final/vqa/fast_mass'])} | {_mean_spread(row['final/follow_rate'])} | "
      f"{_mean_spread(row['final/kv_drift'])} | {_mean_spread(row['final/grad_vlm/flow'])} | "
      f"{_mean_spread(row['mean_update_norm/vlm'])} | "
      f"{_mean_spread(row['final/fast_decode_failures'])} |"
    )
  first = next(iter(summary["arms"].values()))
  lines += [
    "",
    f"Start (every arm, step 0): VQA accuracy {_mean_spread(first['start/vqa/accuracy'])}, "
    f"answer CE {_mean_spread(first['start/vqa/ce_no_fast'])}, following "
    f"{_mean_spread(first['start/follow_rate'])}. Steps to 50% / 80%: of the way from the "
    "seed's step-0 action error (the worst arm's: a fresh expert) to the best final error of "
    "any run "
    f"({summary['best_final_action_mae']:.4g}), interpolated between evaluations. AUC: mean "
    "action error over training.",
    "",
    "## Paired differences (A - B per seed; 95% bootstrap interval over seeds; seeds agreeing)",
    "",
    "| A - B | " + " | ".join(name for name, _ in COMPARED) + " |",
    "|---" * (len(COMPARED) + 1) + "|",
  ]
  for pair, metrics in summary["comparisons"].items():
    cells = []
    for name, _ in COMPARED:
      m = metrics[name]
      cells.append(
        "-"
        if not m["seeds"]
        else f"{m['mean']:+.3g} [{m['low']:+.3g}, {m['high']:+.3g}] {m['same_sign']}/{m['seeds']}"
      )
    lines.append(f"| {pair} | " + " | ".join(cells) + " |")
  if "latency" in results:
    latency = results["latency"]
    lines += [
      "",
      f"Inference latency ({latency['size']} model, batch 1, median of {latency['repeats']}): "
      f"sample_actions ({latency['num_flow_steps']} Euler steps) "
      f"{latency['flow']['median_ms']:.3g} ms, sample_fast ({latency['fast_tokens']} tokens) "
      f"{latency['fast']['median_ms']:.3g} ms: FAST decoding is "
      f"{latency['fast_over_flow']:.1f}x slower.",
    ]
  lines += ["", "![curves](curves.png) ![following](following.png) ![latency](latency.png)", ""]
  return "\n".join(lines)


def plot(results: dict, out: str, arm_switches: dict) -> list[str]:
  """curves.png (CURVES over training: mean, min-max band over seeds), following.png (final
  language following per arm, each seed a dot) and latency.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  setup, pretrain = results["setup"], results["pretrain"]
  figure, axes = plt.subplots(2, 3, figsize=(17, 9))
  for axis, (key, title, _) in zip(axes.flat, CURVES):
    for arm, runs in results["arms"].items():
      steps, values = acting_error(runs) if key == "action_mae" else series(runs, key)
      if not runs or np.all(np.isnan(values)):
        continue
      mean = np.nanmean(values, axis=0)
      style = "--" if arm_switches[arm]["stress"] else "-"
      (line,) = axis.plot(steps, mean, style, marker="o", markersize=3, label=arm)
      if len(runs) > 1:
        axis.fill_between(
          steps,
          np.nanmin(values, axis=0),
          np.nanmax(values, axis=0),
          color=line.get_color(),
          alpha=0.12,
        )
    if key == "vqa/accuracy":
      axis.axhline(pretrain["blind"]["accuracy"], color="black", linestyle=":", label="blind")
    if key == "follow_rate":
      axis.axhline(0.5, color="black", linestyle=":", label="chance")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("training step")
    axis.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  axes.flat[1].legend(fontsize=7)
  figure.suptitle(
    f"KI ablation, size {setup['size']}: mean over seeds {setup['seeds']} (band: min-max), "
    f"{setup['device']}\n{setup['command']}",
    fontsize=10,
  )
  figure.tight_layout()
  paths = [os.path.join(out, "curves.png")]
  figure.savefig(paths[-1], dpi=80)
  plt.close(figure)

  figure, axis = plt.subplots(figsize=(10, 4))
  arms = list(results["arms"])
  for index, arm in enumerate(arms):
    values = np.array(results["summary"]["arms"][arm]["final/follow_rate"], np.float64)
    axis.bar(index, np.nanmean(values), color="tab:blue", alpha=0.5)
    axis.scatter(np.full(len(values), index), values, color="black", s=12, zorder=3)
  start = results["summary"]["arms"][arms[0]]["start/follow_rate"]
  axis.axhline(0.5, color="black", linestyle=":", label="chance")
  axis.axhline(np.nanmean(start), color="gray", linestyle="--", label="step 0 (fresh expert)")
  axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
  axis.set_ylabel("prompts followed (final)")
  axis.set_ylim(0, 1)
  axis.legend(fontsize=8)
  axis.set_title(
    f"counterfactual language following, {setup['language_pairs']} pairs; dots: "
    f"seeds\n{setup['command']}",
    fontsize=9,
  )
  figure.tight_layout()
  paths.append(os.path.join(out, "following.png"))
  figure.savefig(paths[-1], dpi=80)
  plt.close(figure)

  if "latency" in results:
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
    paths.append(os.path.join(out, "latency.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)
  return paths
