r"""XManager launcher: the same `python -m ki.main` on a local Docker executor or on Vertex AI.

  pip install xmanager   # launcher-side only; the training image does not need it
  xmanager launch launch/xm_launch.py -- --executor=local \
    --config=experiments/droid_ki.py:smoke --workdir=/tmp/ki_xm
  xmanager launch launch/xm_launch.py -- --executor=vertex --nodes=16 --accelerator=a100 \
    --accelerators_per_node=8 --config=experiments/droid_ki.py:full --workdir=gs://bucket/ki \
    --override=data.arrayrecord_dir=gs://bucket/droid_ar/train --override=init.path=gs://...

The repository is packaged as a Python container (`pip install .` on --base_image) whose
entrypoint is `ki.main`. A multi-node Vertex job (any number of nodes) is one work unit of two
jobs: worker pool 0, one replica (JAX process 0, the coordinator), and worker pool 1, nodes-1
replicas. All run the same command line; each ki.main finds the coordinator, the process count
and its own index in the CLUSTER_SPEC variable Vertex sets, for jax.distributed.initialize.
Each --override=key=value becomes --config.key=value. What each node runs is built, without
xmanager, by launch/xm_jobs.py (tested in tests/launch).
"""

import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags
from xmanager import xm, xm_local

# xm_jobs sits next to this file; `xmanager launch` runs this file as a script, not a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xm_jobs  # pylint: disable=g-import-not-at-top,wrong-import-position

# xmanager resolves a relative PythonContainer path against this file's folder, not the working
# directory: give it the repository root explicitly.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EXECUTOR = flags.DEFINE_enum("executor", "local", list(xm_jobs.EXECUTORS), "Where to run.")
_CONFIG = flags.DEFINE_string("config", "experiments/droid_ki.py:smoke", "Experiment[:variant].")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoints and logs (gs:// on Vertex).", required=True
)
_OVERRIDES = flags.DEFINE_multi_string("override", [], "key=value config overrides.")
_NODES = flags.DEFINE_integer("nodes", 1, "Hosts (one JAX process each; >1 only on Vertex).")
_ACCELERATOR = flags.DEFINE_string(
  "accelerator", "a100", "xm.JobRequirements resource name (a100, a100_80gib, h100, ...)."
)
_ACCELERATORS_PER_NODE = flags.DEFINE_integer(
  "accelerators_per_node", None, "Accelerators per host (default: 8 on Vertex, none locally)."
)
_BASE_IMAGE = flags.DEFINE_string(
  "base_image", "nvcr.io/nvidia/jax:25.04-py3", "Docker base image with CUDA and Python 3.11."
)


def stage_repo(repo: str = REPO) -> str:
  """A copy of the files git tracks, as the build context: xmanager copies the whole path into
  the Docker context, and the checkout also holds .venv, caches and results."""
  listed = subprocess.run(
    ["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True, text=True
  ).stdout.split("\0")
  staged = os.path.join(tempfile.mkdtemp(prefix="ki_xm_"), "ki")
  for name in filter(None, listed):
    source = os.path.join(repo, name)
    if os.path.isfile(source):  # a tracked file deleted in the checkout is left out
      os.makedirs(os.path.dirname(os.path.join(staged, name)), exist_ok=True)
      shutil.copy2(source, os.path.join(staged, name))
  return staged


def docker_instructions(path: str) -> list[str]:
  """The image steps. xmanager's default ones install a requirements.txt, which ki does not have.
  pyproject asks for plain jax, so its CUDA plugin is named here; google-cloud-storage is imported
  by the entrypoint wrapper xmanager puts in every Vertex image (it resolves late bindings)."""
  directory = os.path.basename(path.rstrip(os.sep))
  return [
    "ENV LANG=C.UTF-8",
    "RUN python -m pip install --upgrade pip",
    "RUN python -m pip install google-cloud-storage",
    f"COPY {directory}/ {directory}",
    f"WORKDIR {directory}",
    'RUN python -m pip install . "jax[cuda12]"',
  ]


def executable_spec(base_image: str, path: str) -> xm.PythonContainer:
  return xm.PythonContainer(
    path=path,
    base_image=base_image,
    entrypoint=xm.ModuleName("ki.main"),
    docker_instructions=docker_instructions(path),
  )


def to_executor(job: xm_jobs.NodeJob, executor: str) -> xm.Executor:
  """Vertex: the job's replica count is its worker pool's replicaCount (xmanager's Vertex client
  makes one pool per job of the JobGroup, in order, and refuses replicas > 1 in pool 0)."""
  if executor == "vertex":
    return xm_local.Vertex(
      requirements=xm.JobRequirements(**job.requirements, replicas=job.replicas)
    )
  if job.replicas != 1:
    raise ValueError(f"{job.name}: the local executor runs one replica, not {job.replicas}")
  requirements = xm.JobRequirements(**job.requirements)
  # A local workdir (made absolute by main) is mounted at the same path, so checkpoints outlive
  # the container.
  workdir = str(job.args["workdir"])
  volumes = {} if "://" in workdir else {workdir: workdir}
  return xm_local.Local(
    requirements=requirements, docker_options=xm_local.DockerOptions(volumes=volumes)
  )


def executor_spec(executor: str) -> xm.ExecutorSpec:
  return xm_local.Local.Spec() if executor == "local" else xm_local.Vertex.Spec()


@xm.run_in_asyncio_loop
async def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  if _EXECUTOR.value == "local" and "://" not in workdir:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
  try:
    jobs = xm_jobs.node_jobs(
      executor=_EXECUTOR.value,
      config=_CONFIG.value,
      workdir=workdir,
      overrides=_OVERRIDES.value,
      nodes=_NODES.value,
      accelerator=_ACCELERATOR.value,
      accelerators_per_node=_ACCELERATORS_PER_NODE.value,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  async with xm_local.create_experiment(experiment_title=f"ki {_CONFIG.value}") as experiment:
    [executable] = experiment.package(
      [
        xm.Packageable(
          executable_spec=executable_spec(_BASE_IMAGE.value, stage_repo()),
          executor_spec=executor_spec(_EXECUTOR.value),
        ),
      ]
    )
    xm_jobs_by_name = {
      job.name: xm.Job(
        executable=executable, executor=to_executor(job, _EXECUTOR.value), args=dict(job.args)
      )
      for job in jobs
    }
    await experiment.add(xm.JobGroup(**xm_jobs_by_name))


if __name__ == "__main__":
  app.run(main)
