"""The tokenizer benchmark runs in quick mode and writes its JSON and table."""

import json

from benchmarks import tokenizer_bench


def test_quick_benchmark_writes_results(tmp_path, capsys):
  tokenizer_bench.main(["--quick", "--out_dir", str(tmp_path)])
  results = json.loads((tmp_path / "tokenizer_quick.json").read_text())
  assert results["command"] == f"python -m benchmarks.tokenizer_bench --quick --out_dir {tmp_path}"
  assert results["batch"] == 256 and (results["horizon"], results["action_dim"]) == (16, 8)
  assert results["fast_encode_batch_ms"] > 0 and results["prompts_with_fast_batch_ms"] > 0
  lengths = results["lengths"]
  for stats in lengths.values():
    assert 0 < stats["p50"] <= stats["p99"] <= stats["max"]
  # Every prompt is BOS + text, then FAST ids, "|" (at least one piece) and EOS.
  assert lengths["total"]["max"] >= lengths["prefix"]["p50"] + lengths["fast"]["p50"] + 2
  table = capsys.readouterr().out
  assert "| FAST encode, 256 chunks [16, 8] |" in table and "total tokens" in table
