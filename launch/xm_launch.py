r"""XManager launcher: the same `python -m ki.main` on a local Docker executor or on Vertex AI.

  pip install xmanager   # launcher-side only; the training image does not need it
  xmanager launch launch/xm_launch.py -- --executor=local \
    --config=experiments/droid_ki.py:smoke --workdir=/tmp/ki_xm
  xmanager launch launch/xm_launch.py -- --executor=vertex --nodes=4 --accelerator=a100 \
    --accelerators_per_node=8 --config=experiments/droid_ki.py:full --workdir=gs://bucket/ki \
    --override=data.arrayrecord_dir=gs://bucket/droid_ar/train --override=init.path=gs://...

The repository is packaged as a Python container whose entrypoint is `ki.main`. A multi-node
Vertex job is one work unit with one job per node: every node gets the coordinator address of
worker pool 0, the process count and its own index, which ki.main passes to
jax.distributed.initialize. Each --override=key=value becomes --config.key=value.
"""

from absl import app
from absl import flags
from xmanager import xm
from xmanager import xm_local
from xmanager.cloud import utils as xm_cloud_utils

_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where to run.")
_CONFIG = flags.DEFINE_string("config", "experiments/droid_ki.py:smoke", "Experiment[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and logs (gs:// on Vertex).",
                               required=True)
_OVERRIDES = flags.DEFINE_multi_string("override", [], "key=value config overrides.")
_NODES = flags.DEFINE_integer("nodes", 1, "Hosts (one JAX process each).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "a100", "xm.JobRequirements resource name.")
_ACCELERATORS_PER_NODE = flags.DEFINE_integer("accelerators_per_node", 8, "Accelerators per host.")
_BASE_IMAGE = flags.DEFINE_string(
  "base_image", "nvcr.io/nvidia/jax:25.04-py3", "Docker base image with CUDA and Python 3.11.")
_COORDINATOR_PORT = 12345


def _train_args(process_id: int | None) -> dict:
  args = {"config": _CONFIG.value, "workdir": _WORKDIR.value}
  for override in _OVERRIDES.value:
    key, sep, value = override.partition("=")
    if not sep:
      raise app.UsageError(f"--override={override!r} must be key=value")
    args[f"config.{key}"] = value
  if process_id is not None:
    address = xm_cloud_utils.get_workerpool_address("workerpool0")
    args.update({
      "coordinator_address": xm.ShellSafeArg(f"{address}:{_COORDINATOR_PORT}"),
      "num_processes": _NODES.value,
      "process_id": process_id,
    })
  return args


@xm.run_in_asyncio_loop
async def main(argv):
  del argv
  title = f"ki {_CONFIG.value}"
  async with xm_local.create_experiment(experiment_title=title) as experiment:
    if _EXECUTOR.value == "local":
      executor_spec, executors = xm_local.Local.Spec(), [xm_local.Local()]
    else:
      requirements = xm.JobRequirements(**{_ACCELERATOR.value: _ACCELERATORS_PER_NODE.value})
      executor_spec = xm_local.Vertex.Spec()
      executors = [xm_local.Vertex(requirements) for _ in range(_NODES.value)]
    [executable] = experiment.package([
      xm.Packageable(
        executable_spec=xm.PythonContainer(
          path=".", base_image=_BASE_IMAGE.value, entrypoint=xm.ModuleName("ki.main")),
        executor_spec=executor_spec,
      )
    ])
    multi_node = len(executors) > 1
    jobs = {
      f"node_{i}": xm.Job(executable=executable, executor=executor,
                          args=_train_args(i if multi_node else None))
      for i, executor in enumerate(executors)
    }
    await experiment.add(xm.JobGroup(**jobs))


if __name__ == "__main__":
  app.run(main)
