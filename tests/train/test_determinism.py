"""The traced train step does not depend on Python's per-process string hashing.

Every host of a multi-host run traces the step itself, and the persistent compilation cache is
keyed by the program: a set iterated in hash order (as make_optimizer once did with its group
names) gives each process a different program — cache misses everywhere, and hosts whose
collectives may come in different orders.
"""

import os
import subprocess
import sys

from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROGRAM_HASH = """
import hashlib
from benchmarks import train_bench
setup = train_bench.build_train_step(train_bench.model_config("tiny"), 1, num_devices=1)
print(hashlib.sha256(setup.lower().as_text().encode())
      .hexdigest())
"""


def _program_hash(hash_seed: int) -> str:
  env = xla_flags.subprocess_env(PYTHONHASHSEED=str(hash_seed), PYTHONPATH=REPO)
  result = subprocess.run(
    [sys.executable, "-c", _PROGRAM_HASH],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.split()[-1]


def test_train_step_program_is_the_same_for_every_hash_seed():
  # Seeds 4 and 5 order the set {"vlm", "action_expert"} differently on CPython 3.11.
  assert _program_hash(4) == _program_hash(5)
