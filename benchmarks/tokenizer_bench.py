"""Tokenizer speed and prompt lengths on DROID-like data.

  python -m benchmarks.tokenizer_bench [--quick] [--out_dir benchmarks/results]

Writes <out_dir>/tokenizer.json (tokenizer_quick.json with --quick) and prints a markdown table.

Measures, for a host batch of 256 DROID-sized chunks (H = 16 steps at 15 Hz, D = 8: 7 joint
positions + gripper), the time to FAST-encode the batch and the time to build the 256 full
training prompts (pi0.5 prefix + FAST postfix); and the token-length distribution (p50 / p99 /
max) of those prompts, from which the default max_token_len is chosen. The data is synthetic: smooth
joint trajectories with gripper open/close events, quantile-normalised as in training, and
instructions from DROID-style templates; the SentencePiece model is a small one trained here in
PaliGemma's layout (digits are split one per token as in Gemma's, so state costs the same).
"""

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks import results_writer
from ki.tokenizers import fast, prompt

HORIZON = 16
ACTION_DIM = 8
BATCH = 256
_VERBS = ("put", "place", "move", "pick up", "push", "take", "drop", "stack")
_OBJECTS = (
  "the marker",
  "the red cup",
  "the blue block",
  "the spoon",
  "the towel",
  "the green bowl",
  "the tape",
  "the lid",
  "the black pen",
  "the small plush toy",
  "the orange",
  "the sponge",
)
_PLACES = (
  "in the bowl",
  "on the plate",
  "into the drawer",
  "to the left",
  "next to the mug",
  "on top of the box",
  "in the sink",
  "onto the shelf",
  "behind the laptop",
  "",
)
_OTHERS = (
  "close the top drawer",
  "open the cabinet door",
  "turn on the faucet",
  "wipe the table",
  "fold the cloth in half",
  "unplug the charger from the socket",
  "close the laptop lid",
)


def droid_like_instruction(rng: np.random.Generator) -> str:
  if rng.random() < 0.3:
    return str(rng.choice(_OTHERS))
  words = [rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
  text = " ".join(str(w) for w in words if w)
  return text.capitalize() if rng.random() < 0.5 else text


def droid_like_episode(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Raw joint positions + gripper of one episode: states [T, 8] and actions [T, 8]."""
  noise = rng.normal(0.0, 0.02, (length + 20, 7))
  kernel = np.hanning(15) / np.hanning(15).sum()  # Low-pass: arm motions are smooth at 15 Hz.
  velocity = np.stack([np.convolve(noise[:, j], kernel, "same") for j in range(7)], -1)[10:-10]
  joints = rng.uniform(-1.5, 1.5, 7) + np.cumsum(velocity, 0)
  gripper = np.zeros(length)
  for start in np.sort(rng.integers(0, length, 2)):
    gripper[start:] = 1.0 - gripper[start]
  gripper = np.convolve(np.pad(gripper, 2, mode="edge"), np.ones(5) / 5, "valid")
  states = np.concatenate([joints, gripper[:, None]], -1)
  actions = np.concatenate([states[1:], states[-1:]], 0)  # The commanded next position.
  return states, actions


def normalised_examples(rng: np.random.Generator, episodes: int):
  """Yields (instruction, state [8], action chunk [16, 8]), quantile-normalised per dimension."""
  raw = [droid_like_episode(rng, int(rng.integers(80, 300))) for _ in range(episodes)]
  all_actions = np.concatenate([a for _, a in raw])
  q01, q99 = np.quantile(all_actions, 0.01, 0), np.quantile(all_actions, 0.99, 0)

  def normalise(x):
    return (x - q01) / (q99 - q01 + 1e-6) * 2 - 1

  for states, actions in raw:
    instruction = droid_like_instruction(rng)
    index = np.minimum(np.arange(len(actions))[:, None] + np.arange(HORIZON), len(actions) - 1)
    for t in range(len(actions)):
      yield instruction, normalise(states[t]), normalise(actions[index[t]])


def _median_ms(function, repeats: int) -> float:
  function()  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def run(quick: bool) -> dict:
  rng = np.random.default_rng(0)
  fit_examples = list(normalised_examples(rng, 30 if quick else 300))
  chunks = [chunk for _, _, chunk in fit_examples]
  start = time.perf_counter()
  fast_tokenizer = fast.FastTokenizer.fit(chunks, vocab_size=1024, scale=10.0)
  fit_seconds = time.perf_counter() - start

  texts = [prompt.robot_prompt_text(i, s) for i, s, _ in fit_examples[:: 5 if quick else 20]]
  with tempfile.TemporaryDirectory() as directory:
    model = prompt.build_sentencepiece_model(
      texts, os.path.join(directory, "bench.model"), text_vocab_size=1000
    )
    prompt_tokenizer = prompt.PromptTokenizer(model)
  # openpi's pi0.5 length for timing; a length nothing reaches for measuring the distribution.
  tokenizer = prompt.Pi05Tokenizer(prompt_tokenizer, fast_tokenizer, max_token_len=200)
  unbounded = prompt.Pi05Tokenizer(prompt_tokenizer, fast_tokenizer, max_token_len=10_000)

  # Held-out examples: new episodes, normalised with their own statistics.
  held_out = list(normalised_examples(np.random.default_rng(1), 10 if quick else 100))
  picks = np.random.default_rng(2).choice(len(held_out), BATCH, replace=False)
  batch = [held_out[i] for i in picks]
  batch_chunks = np.stack([chunk for _, _, chunk in batch])
  repeats = 3 if quick else 20
  encode_ms = _median_ms(lambda: fast_tokenizer.encode(batch_chunks), repeats)
  prompts_ms = _median_ms(
    lambda: [tokenizer.tokenize_robot(*example) for example in batch], repeats
  )

  lengths = {"prefix": [], "fast": [], "total": []}
  for instruction, state, chunk in held_out:
    tokens = unbounded.tokenize_robot(instruction, state, chunk)
    total = int(tokens["tokenized_prompt_mask"].sum())
    lengths["total"].append(total)
    lengths["prefix"].append(total - int(tokens["token_loss_mask"].sum()))  # BOS + prompt text.
    lengths["fast"].append(len(fast_tokenizer.encode(chunk)))

  def summary(values):
    return {
      "p50": float(np.percentile(values, 50)),
      "p99": float(np.percentile(values, 99)),
      "max": int(np.max(values)),
    }

  return {
    "cpu": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
    "batch": BATCH,
    "horizon": HORIZON,
    "action_dim": ACTION_DIM,
    "fast_vocab_size": fast_tokenizer.vocab_size,
    "fast_fit_chunks": len(chunks),
    "fast_fit_seconds": fit_seconds,
    "fast_encode_batch_ms": encode_ms,
    "prompts_with_fast_batch_ms": prompts_ms,
    "length_examples": len(held_out),
    "lengths": {name: summary(values) for name, values in lengths.items()},
  }


def markdown(results: dict) -> str:
  rows = [
    ("FAST encode, 256 chunks [16, 8]", f"{results['fast_encode_batch_ms']:.1f} ms"),
    ("pi0.5 prompts + FAST, 256 examples", f"{results['prompts_with_fast_batch_ms']:.1f} ms"),
    (f"FAST fit, {results['fast_fit_chunks']} chunks", f"{results['fast_fit_seconds']:.2f} s"),
  ]
  for name, stats in results["lengths"].items():
    value = f"{stats['p50']:.0f} / {stats['p99']:.0f} / {stats['max']}"
    rows.append((f"{name} tokens (p50 / p99 / max)", value))
  lines = [f"Tokenizers on {results['cpu']}", "", "| measure | value |", "|---|---|"]
  return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer episodes and repeats")
  parser.add_argument("--out_dir", default=None, help="default: benchmarks/results")
  args = parser.parse_args(argv)
  results = run(args.quick)
  return results_writer.publish(
    "tokenizer", results, quick=args.quick, argv=argv, out_dir=args.out_dir, table=markdown
  )


if __name__ == "__main__":
  main()
