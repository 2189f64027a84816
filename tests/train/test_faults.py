"""Training faults: killed (SIGKILL) while a checkpoint is written, the disk full at save time and
preemption (SIGTERM) with real processes; a damaged newest checkpoint and none that restores
(in-process restarts). No fault loses more than the steps since the last committed checkpoint;
none trains from scratch over a workdir."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ki import checkpoint as checkpoint_lib
from tests.train.tiny import make_trainer, tiny_train_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The in-process trainers share the compiled tiny step with the other trainer tests, and the
# subprocesses reuse it through the compilation cache.
pytestmark = pytest.mark.xdist_group("tiny_trainer")


def _start(workdir, total_steps, cache_dir, *flags):
  command = [
    sys.executable,
    "-m",
    "tests.train.train_fake",
    f"--workdir={workdir}",
    f"--total_steps={total_steps}",
    f"--cache_dir={cache_dir}",
    *flags,
  ]
  return subprocess.Popen(
    command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _losses(output: str) -> dict[int, float]:
  """train_fake's "LOSS <step> <loss> END" markers."""
  return {int(m[1]): float(m[2]) for m in re.finditer(r"LOSS (\d+) (\S+) END", output)}


def _step_folders(workdir) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _result(output):
  lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
  assert lines, output[-3000:]
  return json.loads(lines[-1][len("RESULT ") :])


# One workdir through four faults, so that each start after a fault is also the next fault's run.
@pytest.mark.slow
def test_killed_mid_save_disk_full_preempted_and_resumed(tmp_path, compilation_cache):
  # 1. SIGKILL while checkpoint 4 is written but not committed (its commit is held back).
  killed = _start(tmp_path, 10_000, compilation_cache, "--pause_commit_from_step=4")
  lines = []
  try:
    for line in killed.stdout:
      lines.append(line)
      if "COMMIT PAUSED 4" in line:
        break
    else:
      raise AssertionError("".join(lines[-100:]))
  finally:
    killed.kill()
    lines.append(killed.communicate()[0])
  uninterrupted = _losses("".join(lines))
  assert {3, 4} <= set(uninterrupted)
  assert _step_folders(tmp_path) == ["2", "4.orbax-checkpoint-tmp"]

  # 2. The same command, on a disk that fills up: it resumes from the last committed step (the
  # unfinished one removed), trains, and cannot write checkpoint 4.
  full = _start(tmp_path, 6, compilation_cache, "--max_file_bytes=50000")
  output = full.communicate(timeout=300)[0]
  assert full.returncode != 0, output[-3000:]
  assert "Resuming from checkpoint 2 in" in output, output[-3000:]
  step_dir = tmp_path / "checkpoints" / "4"
  assert (
    f"CheckpointSaveError: Could not write checkpoint 4 to {step_dir}: " in output
    and "File too large" in output
    and "The last committed checkpoint, step 2, is intact" in output
  ), output[-3000:]
  resumed = _losses(output)
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step], uninterrupted[step], rtol=1e-6, err_msg=str(step))

  # 3. Space again: the next start resumes from step 2, with the losses of a run never
  # interrupted, until a preemption notice (SIGTERM): it saves that step and exits 0.
  preempted = _start(tmp_path, 10_000, compilation_cache)
  deadline = time.time() + 240
  while not step_dir.exists():
    assert preempted.poll() is None, preempted.communicate()[0][-3000:]
    assert time.time() < deadline, "training did not reach step 4"
    time.sleep(0.5)
  preempted.send_signal(signal.SIGTERM)
  output = preempted.communicate(timeout=240)[0]
  assert preempted.returncode == 0, output[-3000:]
  assert "Stopped by SIGTERM" in output
  stopped = _result(output)
  assert stopped["start_step"] == 2
  for step in (3, 4):
    np.testing.assert_allclose(stopped["losses"][str(step)], uninterrupted[step], rtol=1e-6)
  last = max(int(step) for step in stopped["losses"])
  assert stopped["latest_checkpoint"] == last
  assert not [name for name in _step_folders(tmp_path) if not name.isdigit()]

  # 4. Restarted (in this process, sharing the compiled step): one more step from there.
  trainer = make_trainer(tiny_train_config(total_steps=last + 1), tmp_path)
  assert trainer.start_step == last
  assert sorted(trainer.run()) == [last + 1]
  trainer.close()


def _damage(step_dir, how):
  """Truncates (or deletes) the largest data file of the step's state item."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  if how == "truncate":
    with open(largest, "r+b") as f:
      f.truncate(largest.stat().st_size // 2)
  else:
    largest.unlink()


def test_damaged_newest_checkpoint_resumes_from_the_newest_good_one(
  tmp_path, compilation_cache, caplog
):
  config = tiny_train_config(total_steps=4)
  first = make_trainer(config, tmp_path)
  straight = first.run()
  first.close()
  checkpoints = tmp_path / "checkpoints"
  _damage(checkpoints / "4", "truncate")

  with caplog.at_level(logging.INFO):
    second = make_trainer(config, tmp_path)
  assert second.start_step == 2
  assert f"Checkpoint 4 in {checkpoints} is damaged: " in caplog.text
  assert "RESUMING FROM AN OLDER CHECKPOINT: step 2" in caplog.text
  resumed = second.run()
  second.close()
  for step in (3, 4):
    np.testing.assert_allclose(resumed[step]["loss"], straight[step]["loss"], rtol=1e-5)
  # Step 4 saved again; the damaged one kept aside with the reason.
  assert _step_folders(tmp_path) == ["2", "4"]
  [aside] = (tmp_path / checkpoint_lib.DAMAGED_DIR).iterdir()
  assert aside.name.startswith("4-") and (aside / "WHY_DAMAGED.txt").read_text().strip()

  # Nothing restores: a refusal naming the workdir and the way out; nothing moved or trained.
  _damage(checkpoints / "4", "delete")
  _damage(checkpoints / "2", "truncate")
  with pytest.raises(checkpoint_lib.DamagedCheckpointsError) as error:
    make_trainer(config, tmp_path)
  message = str(error.value)
  assert f"No checkpoint in {checkpoints} restores:\n  step 4: " in message
  assert "\n  step 2: " in message
  assert f"Refusing to train from scratch over the workdir {tmp_path}" in message
  assert f"mv {checkpoints} {checkpoints}.damaged" in message
  assert _step_folders(tmp_path) == ["2", "4"]
