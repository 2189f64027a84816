"""What each node of an XManager launch runs, as plain data: no xmanager import here.

launch/xm_launch.py turns these NodeJobs into xm.Jobs; tests/launch checks them against the flags
ki.main really defines. A NodeJob's `args` is the dict handed to xm.Job(args=...), which xmanager
renders as `--key=value` after `python -m ki.main`; `to_argv` does the same for tests.

Vertex AI runs the xm.Jobs of one JobGroup as worker pools 0, 1, 2, ... (one replica each) and
sets CLUSTER_SPEC in every container. Its workerpool0 entry is already `host:port` (port 2222),
and xmanager's image wrapper replaces the late binding `%objectname(workerpool0)%` in the container
arguments with that entry, so it is the whole --coordinator_address: no port is appended. Vertex
allows at most 4 worker pools, so at most 4 nodes (xmanager's Vertex client raises beyond that);
more would need one pool with replicas, whose index ki.main would have to read from CLUSTER_SPEC.
"""

import dataclasses
import re

# Late binding that xmanager's Vertex image wrapper (cloud/utils.py map_workerpool_address_args)
# replaces at run time with CLUSTER_SPEC's workerpool0 entry, `host:port`.
VERTEX_COORDINATOR = "%objectname(workerpool0)%"
MAX_VERTEX_NODES = 4
DEFAULT_VERTEX_ACCELERATORS = 8
EXECUTORS = ("local", "vertex")

# xmanager's wrapper splits the container arguments on whitespace and deletes `[`, `]` and `,`
# (`tr -d '[],'`) before running ki.main, and xm shell-quotes values (quotes would survive as
# literal characters). Values that need none of that pass unchanged.
_VERTEX_SAFE_VALUE = re.compile(r"[A-Za-z0-9_@%+=:./-]*")


@dataclasses.dataclass(frozen=True)
class NodeJob:
  """One node: its job name, ki.main's flags (in order) and its xm.JobRequirements kwargs."""
  name: str
  args: dict[str, str | int]
  requirements: dict[str, int]


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


def node_jobs(*, executor: str, config: str, workdir: str, overrides=(), nodes: int = 1,
              accelerator: str | None = None, accelerators_per_node: int | None = None,
              coordinator_address: str = VERTEX_COORDINATOR) -> list[NodeJob]:
  """The jobs of one work unit: one per node, each running `python -m ki.main` with its flags.

  With more than one node every job gets --coordinator_address (process 0's address, which ki.main
  passes to jax.distributed.initialize), --num_processes and its own --process_id; job i must
  run on worker pool i, which is where Vertex puts the i-th job of a JobGroup.

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
  if executor == "vertex" and nodes > MAX_VERTEX_NODES:
    raise ValueError(f"nodes={nodes}: a Vertex job has at most {MAX_VERTEX_NODES} worker pools "
                     "and each node is one pool")
  if accelerators_per_node is None:
    vertex_gpus = executor == "vertex" and accelerator
    accelerators_per_node = DEFAULT_VERTEX_ACCELERATORS if vertex_gpus else 0
  if accelerators_per_node < 0:
    raise ValueError(f"accelerators_per_node={accelerators_per_node} must be >= 0")
  base = {"config": config, "workdir": workdir, **parse_overrides(list(overrides))}
  if executor == "vertex":
    for key, value in base.items():
      if not _VERTEX_SAFE_VALUE.fullmatch(value):
        raise ValueError(f"--{key}={value!r}: on Vertex, xmanager's entrypoint wrapper drops "
                         "'[', ']' and ',' and splits on spaces; use a value without them")
  requirements = {}
  if accelerators_per_node:
    resource = accelerator if executor == "vertex" else "local_gpu"
    if not resource:
      raise ValueError("accelerators_per_node needs an accelerator name on Vertex")
    requirements[resource] = accelerators_per_node
  jobs = []
  for index in range(nodes):
    args = dict(base)
    if nodes > 1:
      args.update(coordinator_address=coordinator_address, num_processes=nodes, process_id=index)
    jobs.append(NodeJob(name=f"node_{index}", args=args, requirements=dict(requirements)))
  return jobs


def to_argv(args: dict[str, str | int]) -> list[str]:
  """The command-line flags xmanager makes of a job's args dict (no shell quoting)."""
  return [f"--{key}={value}" for key, value in args.items()]
