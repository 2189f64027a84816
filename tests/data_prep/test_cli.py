"""The data_prep command lines: each a thin job over ki, with its flags, in the order a real run
uses them, writing what the ki functions write in-process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ki.data import normalize, prepare, synthetic_droid
from ki.data.norm_stats import compute_norm_stats

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _job(module: str, *flags: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", f"data_prep.{module}", *flags],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
def test_jobs_chain_and_match_the_library(tmp_path):
  raw, prepared = tmp_path / "raw", tmp_path / "prepared"
  _job(
    "make_synthetic_droid",
    f"--out_dir={raw}",
    "--episodes=4",
    "--episodes_per_shard=2",
    "--vlm_images=4",
    "--text_vocab_size=400",
  )
  info = json.loads((raw / "synthetic_info.json").read_text())
  expected = synthetic_droid.generate(
    str(tmp_path / "in_process"),
    episodes=4,
    episodes_per_shard=2,
    vlm_images=4,
    text_vocab_size=400,
  )
  assert info == expected
  _job(
    "droid_to_arrayrecord",
    f"--rlds_dir={raw / info['dataset_dir']}",
    f"--out_dir={prepared}",
    "--num_workers=1",
  )
  manifest = json.loads((prepared / prepare.MANIFEST).read_text())
  assert manifest["num_records"] > 0 and len(manifest["shards"]) == 2
  stats_path = tmp_path / "norm_stats.json"
  _job("compute_norm_stats", f"--data_dir={prepared}", f"--out={stats_path}")
  written = normalize.load_norm_stats(str(stats_path))
  in_process = compute_norm_stats(str(prepared))
  for key in ("state", "actions"):
    np.testing.assert_allclose(written[key].mean, in_process[key].mean, rtol=1e-6)
    np.testing.assert_allclose(written[key].q99, in_process[key].q99, rtol=1e-6)
  fast_dir = tmp_path / "fast"
  _job(
    "fit_fast_tokenizer",
    f"--data_dir={prepared}",
    f"--norm_stats={stats_path}",
    f"--out_dir={fast_dir}",
    "--vocab_size=1024",
    "--delta_action_mask=1,1,1,1,1,1,1,0",
  )
  from ki.tokenizers import fast

  tokenizer = fast.FastTokenizer.load(str(fast_dir))
  assert tokenizer.encode(np.zeros((16, 8), np.float32))
