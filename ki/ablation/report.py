"""The KI ablation's summary of its runs: final values, steps to an action-error threshold, the
Markdown table (ablation.md) and the plots (curves.png, latency.png).

`results` is what ki.ablation.runner collects: {"arms": {arm: [run per seed]}, "latency": ...,
"setup": ...}, each run {"eval": {step: {metric: value}}, "train": ..., "seconds": ...}.
"""

import os
import platform

import jax
import numpy as np

# The metrics plotted and tabulated: (eval key, title, lower is better).
CURVES = (
  ("eval/robot/action_mae", "held-out action error (raw units, 10 flow steps)", True),
  ("eval/robot/fast_accuracy", "held-out FAST token accuracy", False),
  ("eval/vlm/text_ce", "VLM held-out question loss (language retention)", True),
  ("eval/vlm/text_exact_match", "VLM held-out exact-match answers", False),
)


def describe_device() -> str:
  """'CPU, N cores (machine)' or 'Nx <accelerator kind>': where the numbers came from."""
  if jax.default_backend() == "cpu":
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"
  devices = jax.devices()
  return f"{len(devices)}x {devices[0].device_kind}"


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


def markdown(results: dict, summary: dict, arm_switches: dict) -> str:
  """ablation.md; arm_switches: the experiment's ARMS ({arm: {knowledge_insulation, token_loss,
  cotrain, ...}})."""
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
    switches, row = arm_switches[arm], summary[arm]
    text_ce, exact = row["eval/vlm/text_ce"], row["eval/vlm/text_exact_match"]
    reached = int(np.sum(np.isfinite(row["steps_to_threshold"])))
    lines.append(
      f"| {arm} | {'yes' if switches['knowledge_insulation'] else 'no'} | "
      f"{'yes' if switches['token_loss'] else 'no'} | {'yes' if switches['cotrain'] else 'no'} | "
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
  """curves.png (the CURVES over training, mean and min-max band over seeds) and latency.png."""
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
