"""What each node of an XManager launch runs, as plain data: no xmanager import here.

launch/xm_launch.py turns these NodeJobs into xm.Jobs; tests/launch checks them against the flags
ki.main really defines. A NodeJob's `args` is the dict handed to xm.Job(args=...), which xmanager
renders as `--key=value` after `python -m ki.main`; `to_argv` does the same for tests.

A multi-node Vertex job is the layout Vertex intends: worker pool 0 is one replica (the primary,
JAX process 0 and coordinator), worker pool 1 is the other nodes-1 replicas of the same job, so
any number of nodes fits in two pools. Replicas of one pool get the same command line: no node
gets process flags. ki.main reads the coordinator, process count and its own index from the
CLUSTER_SPEC variable Vertex sets on every replica (ki.main.vertex_cluster).
"""

import dataclasses
import re

DEFAULT_VERTEX_ACCELERATORS = 8
EXECUTORS = ("local", "vertex")

# xmanager's wrapper splits the container arguments on whitespace and deletes `[`, `]` and `,`
# (`tr -d '[],'`) before running ki.main, and xm shell-quotes values (quotes would survive as
# literal characters). Values that need none of that pass unchanged.
_VERTEX_SAFE_VALUE = re.compile(r"[A-Za-z0-9_@%+=:./-]*")


@dataclasses.dataclass(frozen=True)
class NodeJob:
  """One worker pool: its job name, ki.main's flags (in order), its xm.JobRequirements resource
  kwargs (per replica) and how many identical replicas (nodes) run it."""

  name: str
  args: dict[str, str | int]
  requirements: dict[str, int]
  replicas: int = 1


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
  """["a.b=1", ...] -> {"config.a.b": "1", ...}, the --config.a.b=1 flags of ki.main."""
  parsed = {}
  for override in overrides:
    key, sep, value = override.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--override={override!r} must be key=value")
    if key.startswith("config."):
      raise ValueError(f"--override={override!r}: give the key without the 'config.' prefix")
    parsed[f"config.{key}"] = value
  return parsed


def node_jobs(
  *,
  executor: str,
  config: str,
  workdir: str,
  overrides=(),
  nodes: int = 1,
  accelerator: str | None = None,
  accelerators_per_node: int | None = None,
) -> list[NodeJob]:
  """The jobs of one work unit, each running `python -m ki.main` with the same flags.

  One node: one job. More (Vertex only): `node_0` with one replica, then `workers` with nodes-1
  replicas; Vertex puts the i-th job of a JobGroup in worker pool i, so the order matters.

  Requirements: on Vertex `{accelerator: accelerators_per_node}` (default 8 when an accelerator
  is named, none without one); xmanager's local executor only honours `local_gpu` (GPUs handed
  to the container, default 0: CPU).
  """
  if executor not in EXECUTORS:
    raise ValueError(f"executor {executor!r} is not one of {EXECUTORS}")
  if not config:
    raise ValueError("config is required")
  if not workdir:
    raise ValueError("workdir is required")
  if nodes < 1:
    raise ValueError(f"nodes={nodes} must be at least 1")
  if executor == "local" and nodes > 1:
    raise ValueError("the local executor runs one container: use nodes=1")
  if accelerators_per_node is None:
    vertex_gpus = executor == "vertex" and accelerator
    accelerators_per_node = DEFAULT_VERTEX_ACCELERATORS if vertex_gpus else 0
  if accelerators_per_node < 0:
    raise ValueError(f"accelerators_per_node={accelerators_per_node} must be >= 0")
  base = {"config": config, "workdir": workdir, **parse_overrides(list(overrides))}
  if executor == "vertex":
    for key, value in base.items():
      if not _VERTEX_SAFE_VALUE.fullmatch(value):
        raise ValueError(
          f"--{key}={value!r}: on Vertex, xmanager's entrypoint wrapper drops "
          "'[', ']' and ',' and splits on spaces; use a value without them"
        )
  requirements = {}
  if accelerators_per_node:
    resource = accelerator if executor == "vertex" else "local_gpu"
    if not resource:
      raise ValueError("accelerators_per_node needs an accelerator name on Vertex")
    requirements[resource] = accelerators_per_node
  jobs = [NodeJob(name="node_0", args=dict(base), requirements=dict(requirements))]
  if nodes > 1:
    jobs.append(
      NodeJob(name="workers", args=dict(base), requirements=dict(requirements), replicas=nodes - 1)
    )
  return jobs


def to_argv(args: dict[str, str | int]) -> list[str]:
  """The command-line flags xmanager makes of a job's args dict (no shell quoting)."""
  return [f"--{key}={value}" for key, value in args.items()]
