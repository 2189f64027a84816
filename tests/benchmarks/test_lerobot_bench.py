"""benchmarks/lerobot_bench.py in quick mode: it runs, writes its JSON and every rate is real."""

import json

from benchmarks import lerobot_bench


def test_lerobot_bench_quick(tmp_path):
  results = lerobot_bench.main(["--quick", "--out_dir", str(tmp_path)])
  written = json.loads((tmp_path / "lerobot_quick.json").read_text())
  assert written["command"] == "python -m benchmarks.lerobot_bench --quick --out_dir " + str(
    tmp_path
  )
  assert set(results["resolutions"]) == set(lerobot_bench.RESOLUTIONS)
  for row in results["resolutions"].values():
    for key in (
      "source_shuffled_samples_per_second",
      "source_in_order_samples_per_second",
      "source_in_order_lookahead_samples_per_second",
      "pipeline_samples_per_second",
    ):
      assert row[key] > 0, key
    assert all(ms > 0 for ms in row["breakdown_ms_per_sample"].values())
