"""python -m ki.ablation: the KI ablation runner (ki/ablation/runner.py)."""

import logging

from ki.ablation import runner

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)
  runner.main()
