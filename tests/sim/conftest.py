"""A tiny Meta-World demonstration dataset (two tasks, 64 px) with its assets, made once."""

import pytest

from ki.sim import metaworld_demos

TASKS = ("reach-v3", "window-close-v3")
EPISODES_PER_TASK = 2
IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def demos(tmp_path_factory):
  root = tmp_path_factory.mktemp("metaworld") / "demos"
  summary = metaworld_demos.generate(
    str(root),
    tasks=TASKS,
    episodes_per_task=EPISODES_PER_TASK,
    image_size=IMAGE_SIZE,
    workers=1,
    progress=False,
  )
  metaworld_demos.build_assets(str(root))
  return root, summary
