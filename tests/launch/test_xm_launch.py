"""The XManager launcher (launch/xm_launch.py): the worker pools and ki.main arguments it builds
(launch/xm_jobs.py, no xmanager needed), that ki.main's own flags accept them, and that ki.main
finds its place in a multi-node Vertex job from CLUSTER_SPEC. The launcher itself is only
imported where xmanager is installed; ki.main only where jax is (the xmanager venv need not)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/droid_ki.py:smoke"
OVERRIDES = [
  "data.arrayrecord_dir=gs://bucket/droid_ar/train",
  "init.path=gs://bucket/vlm",
  "total_steps=7",
  "model.knowledge_insulation=false",
]
# What every Vertex job runs: ki.main's flags, the overrides after --config.
VERTEX_ARGV = [
  f"--config={CONFIG}",
  "--workdir=gs://bucket/ki",
  "--config.data.arrayrecord_dir=gs://bucket/droid_ar/train",
  "--config.init.path=gs://bucket/vlm",
  "--config.total_steps=7",
  "--config.model.knowledge_insulation=false",
]


def _load(name):
  """launch/ is a folder of scripts, not a package: load a file of it by path."""
  spec = importlib.util.spec_from_file_location(
    f"launch_{name}", os.path.join(REPO, "launch", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


xm_jobs = _load("xm_jobs")
needs_ki = pytest.mark.skipif(
  not all(importlib.util.find_spec(m) for m in ("jax", "ml_collections")),
  reason="ki.main needs jax and ml_collections",
)


def _cluster_spec(nodes, pool, index):
  """CLUSTER_SPEC as Vertex sets it on a replica of a `nodes`-node job laid out as xm_jobs does:
  workerpool0 one replica, workerpool1 the other nodes-1."""
  cluster = {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"]}
  if nodes > 1:
    cluster["workerpool1"] = [f"cmle-training-workerpool1-ab-{i}:2222" for i in range(nodes - 1)]
  return json.dumps(
    {
      "cluster": cluster,
      "environment": "cloud",
      "task": {"type": pool, "index": index, "trial": ""},
      "job": "{}",
      "open_ports": [3333],
    }
  )


# Parses argv with ki.main's real flags (absl + ml_collections config_flags, lock_config=True),
# then runs ki.main's own multi-host check with jax.distributed.initialize replaced by a recorder;
# training never starts. Prints what ki.main would see. config_flags reads the --config.* overrides
# from sys.argv (and wants them after --config), so sys.argv is set as `python -m ki.main` sets it.
_PARSE = r"""
import json, sys
import jax
from absl import flags
from ki import main as ki_main
calls = []
jax.distributed.initialize = lambda **kwargs: calls.append(kwargs)
sys.argv = ["ki.main"] + json.loads(sys.argv[1])
argv = flags.FLAGS(sys.argv)
config = ki_main._CONFIG.value
ki_main._initialize_distributed()
print(json.dumps({
  "rest": argv[1:], "workdir": ki_main._WORKDIR.value, "distributed": calls,
  "arrayrecord_dir": config.data.arrayrecord_dir, "init_path": config.init.path,
  "total_steps": config.total_steps, "knowledge_insulation": config.model.knowledge_insulation,
  "locked": config.is_locked}))
"""


def _ki_main_parse(argv, cluster_spec=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CLUSTER_SPEC"}
  if cluster_spec is not None:
    env["CLUSTER_SPEC"] = cluster_spec
  result = subprocess.run(
    [sys.executable, "-c", _PARSE, json.dumps(argv)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_node_runs_ki_main_without_distributed_flags():
  [job] = xm_jobs.node_jobs(
    executor="vertex",
    config=CONFIG,
    workdir="gs://bucket/ki",
    overrides=OVERRIDES,
    accelerator="h100",
    accelerators_per_node=8,
  )
  assert (job.name, job.replicas) == ("node_0", 1)
  assert job.requirements == {"h100": 8}
  assert xm_jobs.to_argv(job.args) == VERTEX_ARGV


@pytest.mark.parametrize("nodes", [1, 2, 4, 16, 64])
def test_nodes_are_pool_0_with_one_replica_and_pool_1_with_the_rest(nodes):
  jobs = xm_jobs.node_jobs(
    executor="vertex",
    config=CONFIG,
    workdir="gs://bucket/ki",
    overrides=OVERRIDES,
    nodes=nodes,
    accelerator="a100",
    accelerators_per_node=8,
  )
  pools = [(job.name, job.replicas) for job in jobs]
  assert pools == [("node_0", 1)] + ([("workers", nodes - 1)] if nodes > 1 else [])
  assert sum(job.replicas for job in jobs) == nodes
  for job in jobs:
    assert job.requirements == {"a100": 8}
    # Replicas of a pool cannot differ in flags: no job carries process flags, all are alike.
    assert xm_jobs.to_argv(job.args) == VERTEX_ARGV


def test_local_is_one_node_without_requirements_unless_asked():
  [job] = xm_jobs.node_jobs(executor="local", config=CONFIG, workdir="/tmp/ki_xm")
  assert job.args == {"config": CONFIG, "workdir": "/tmp/ki_xm"}
  assert job.requirements == {}
  # xmanager's local executor only passes GPUs into the container for `local_gpu`.
  [job] = xm_jobs.node_jobs(
    executor="local",
    config=CONFIG,
    workdir="/tmp/ki_xm",
    accelerator="a100",
    accelerators_per_node=2,
  )
  assert job.requirements == {"local_gpu": 2}


def test_vertex_asks_for_eight_accelerators_by_default():
  [job] = xm_jobs.node_jobs(
    executor="vertex", config=CONFIG, workdir="gs://b/ki", accelerator="a100"
  )
  assert job.requirements == {"a100": 8}


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"overrides": ["no_equals_sign"]}, "key=value"),
    ({"overrides": ["=1"]}, "key=value"),
    ({"overrides": ["config.total_steps=1"]}, "without the 'config.' prefix"),
    ({"nodes": 0}, "at least 1"),
    ({"executor": "local", "nodes": 2}, "one container"),
    ({"executor": "slurm"}, "not one of"),
    ({"workdir": ""}, "workdir is required"),
    ({"overrides": ["data.mixture=[a,b]"]}, "drops"),
    ({"overrides": ["init.path=/a b"]}, "drops"),
    ({"accelerator": None, "accelerators_per_node": 8}, "needs an accelerator name"),
    ({"accelerators_per_node": -1}, ">= 0"),
  ],
)
def test_bad_requests_are_refused(kwargs, message):
  request = {"executor": "vertex", "config": CONFIG, "workdir": "gs://b/ki", **kwargs}
  with pytest.raises(ValueError, match=message):
    xm_jobs.node_jobs(**request)


@needs_ki
def test_ki_main_accepts_the_single_node_argv():
  [job] = xm_jobs.node_jobs(
    executor="vertex", config=CONFIG, workdir="gs://bucket/ki", overrides=OVERRIDES
  )
  seen = _ki_main_parse(xm_jobs.to_argv(job.args))
  assert seen == {
    "rest": [],
    "workdir": "gs://bucket/ki",
    "distributed": [],
    "arrayrecord_dir": "gs://bucket/droid_ar/train",
    "init_path": "gs://bucket/vlm",
    "total_steps": 7,
    "knowledge_insulation": False,
    "locked": True,
  }


@needs_ki
@pytest.mark.parametrize("pool, index, process_id", [("workerpool0", 0, 0), ("workerpool1", 3, 4)])
def test_ki_main_finds_its_process_in_a_16_node_vertex_job(pool, index, process_id):
  # Every replica runs the same argv; only Vertex's CLUSTER_SPEC tells them apart.
  jobs = xm_jobs.node_jobs(
    executor="vertex", config=CONFIG, workdir="gs://bucket/ki", overrides=OVERRIDES, nodes=16
  )
  argv = xm_jobs.to_argv(jobs[0 if pool == "workerpool0" else 1].args)
  seen = _ki_main_parse(argv, cluster_spec=_cluster_spec(16, pool, index))
  assert seen["rest"] == []
  assert seen["distributed"] == [
    {
      "coordinator_address": "cmle-training-workerpool0-ab-0:2222",
      "num_processes": 16,
      "process_id": process_id,
      "heartbeat_timeout_seconds": 60,
    }
  ]
  assert seen["total_steps"] == 7 and seen["knowledge_insulation"] is False


@needs_ki
def test_ki_main_single_replica_vertex_job_is_not_distributed():
  [job] = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://bucket/ki")
  seen = _ki_main_parse(xm_jobs.to_argv(job.args), cluster_spec=_cluster_spec(1, "workerpool0", 0))
  assert seen["distributed"] == []


@needs_ki
def test_ki_main_explicit_flags_win_over_cluster_spec():
  argv = [
    f"--config={CONFIG}",
    "--workdir=/tmp/ki",
    "--coordinator_address=10.0.0.1:1234",
    "--num_processes=2",
    "--process_id=1",
  ]
  seen = _ki_main_parse(argv, cluster_spec=_cluster_spec(16, "workerpool1", 3))
  assert seen["distributed"] == [
    {
      "coordinator_address": "10.0.0.1:1234",
      "num_processes": 2,
      "process_id": 1,
      "heartbeat_timeout_seconds": 60,
    }
  ]


@needs_ki
@pytest.mark.parametrize(
  "nodes, pool, index, process_id",
  [
    (1, "workerpool0", 0, 0),
    (2, "workerpool1", 0, 1),
    (16, "workerpool0", 0, 0),
    (16, "workerpool1", 0, 1),
    (16, "workerpool1", 3, 4),
    (16, "workerpool1", 14, 15),
  ],
)
def test_vertex_cluster_numbers_processes_in_pool_order(nodes, pool, index, process_id):
  from ki import main as ki_main  # pylint: disable=g-import-not-at-top

  assert ki_main.vertex_cluster(_cluster_spec(nodes, pool, index)) == (
    "cmle-training-workerpool0-ab-0:2222",
    nodes,
    process_id,
  )


@needs_ki
def test_vertex_cluster_counts_every_pool_in_order():
  from ki import main as ki_main  # pylint: disable=g-import-not-at-top

  spec = {
    "cluster": {
      "workerpool2": ["c:2222"],
      "workerpool0": ["a:2222"],
      "workerpool1": ["b0:2222", "b1:2222"],
    },
    "task": {"type": "workerpool2", "index": 0},
  }
  assert ki_main.vertex_cluster(json.dumps(spec)) == ("a:2222", 4, 3)


_POOLS = {"workerpool0": ["h0:2222"], "workerpool1": ["h1:2222", "h2:2222"]}


@needs_ki
@pytest.mark.parametrize(
  "spec, message",
  [
    ("not json", "not JSON"),
    ("[]", "not a JSON object"),
    ({"task": {"type": "workerpool0", "index": 0}}, "no 'cluster'"),
    ({"cluster": {}, "task": {"type": "workerpool0", "index": 0}}, "no 'cluster'"),
    (
      {"cluster": {"workerpool1": ["h1:2222"]}, "task": {"type": "workerpool1", "index": 0}},
      "no workerpool0",
    ),
    (
      {"cluster": {"chief": ["h0:2222"]}, "task": {"type": "chief", "index": 0}},
      "'chief' is not a workerpoolN",
    ),
    (
      {"cluster": {"workerpool0": []}, "task": {"type": "workerpool0", "index": 0}},
      "workerpool0 is not a non-empty list",
    ),
    (
      {"cluster": {"workerpool0": "h0:2222"}, "task": {"type": "workerpool0", "index": 0}},
      "workerpool0 is not a non-empty list",
    ),
    (
      {"cluster": {"workerpool0": ["h0"]}, "task": {"type": "workerpool0", "index": 0}},
      "'h0' is not host:port",
    ),
    ({"cluster": _POOLS}, "no 'task'"),
    ({"cluster": _POOLS, "task": {"index": 0}}, "task type None"),
    ({"cluster": _POOLS, "task": {"type": "workerpool2", "index": 0}}, "task type 'workerpool2'"),
    ({"cluster": _POOLS, "task": {"type": ["workerpool1"], "index": 0}}, "task type \\["),
    ({"cluster": _POOLS, "task": {"type": "workerpool1"}}, "task index None"),
    ({"cluster": _POOLS, "task": {"type": "workerpool1", "index": 2}}, r"task index 2 .*0\.\.1"),
    ({"cluster": _POOLS, "task": {"type": "workerpool1", "index": "1"}}, "task index '1'"),
  ],
)
def test_vertex_cluster_refuses_a_malformed_spec(spec, message):
  from ki import main as ki_main  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=message):
    ki_main.vertex_cluster(spec if isinstance(spec, str) else json.dumps(spec))


@needs_ki
def test_ki_main_refuses_an_unknown_override():
  [job] = xm_jobs.node_jobs(
    executor="vertex", config=CONFIG, workdir="gs://bucket/ki", overrides=["no_such_field=1"]
  )
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CLUSTER_SPEC"}
  result = subprocess.run(
    [sys.executable, "-c", _PARSE, json.dumps(xm_jobs.to_argv(job.args))],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "no_such_field" in result.stderr


# Runs where xmanager is installed (it is not a dependency of ki): loads the real launcher, which
# defines its absl flags on import, so in a subprocess. Builds the xm.Jobs of a 16-node Vertex
# launch and hands them to xmanager's real Vertex launch path (vertex.launch -> Client.launch)
# with only the Cloud calls replaced: aiplatform.CustomJob records the worker pool specs it is
# given, and auth answers without credentials. Also picks the Vertex machine type and checks the
# local executor and the entrypoint.
_REAL_LAUNCHER = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "launch"))
import xm_launch, xm_jobs
from xmanager import xm
from xmanager.cloud import vertex
from xmanager.xm_local import executables
executable = executables.GoogleContainerRegistryImage(name="ki", image_path="gcr.io/p/ki:t")
jobs = {}
for job in xm_jobs.node_jobs(executor="vertex", config="experiments/droid_ki.py:smoke",
                             workdir="gs://b/ki", nodes=16, accelerator="a100"):
  jobs[job.name] = xm.Job(executable=executable, executor=xm_launch.to_executor(job, "vertex"),
                          args=dict(job.args))
group = xm.JobGroup(**jobs)
submitted = {}
class FakeCustomJob:
  def __init__(self, **kwargs):
    submitted.update(kwargs)
    self.resource_name = "projects/p/locations/l/customJobs/1"
  def submit(self, **kwargs):
    pass
  def _dashboard_uri(self):
    return "https://console"
vertex.aiplatform.CustomJob = FakeCustomJob
vertex.auth.get_bucket = lambda: "bucket"
vertex.auth.get_service_account = lambda: "sa@p.iam.gserviceaccount.com"
client = object.__new__(vertex.Client)
client.project, client.location = "p", "us-central1"
vertex.set_default_client(client)
vertex.launch("ki", "1", group)
out = {"pools": [{"replicas": pool.replica_count, "argv": list(pool.container_spec.args),
                  "machine_type": pool.machine_spec.machine_type,
                  "gpus": pool.machine_spec.accelerator_count}
                 for pool in submitted["worker_pool_specs"]]}
[local] = xm_jobs.node_jobs(executor="local", config="experiments/droid_ki.py:smoke",
                            workdir="/tmp/ki_xm", accelerators_per_node=1)
executor = xm_launch.to_executor(local, "local")
out["local"] = {"gpus": executor.requirements.task_requirements[xm.ResourceType.LOCAL_GPU],
                "replicas": executor.requirements.replicas,
                "volumes": executor.docker_options.volumes}
spec = xm_launch.executable_spec("python:3.11", xm_launch.REPO)
out["entrypoint"] = spec.entrypoint.module_name
print(json.dumps(out))
"""


def test_the_real_launcher_builds_vertex_worker_pools_with_xmanager():
  pytest.importorskip("xmanager")
  result = subprocess.run(
    [sys.executable, "-c", _REAL_LAUNCHER, REPO],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  argv = ["--config=experiments/droid_ki.py:smoke", "--workdir=gs://b/ki"]
  assert out["pools"] == [
    {"replicas": 1, "argv": argv, "machine_type": "a2-highgpu-8g", "gpus": 8},
    {"replicas": 15, "argv": argv, "machine_type": "a2-highgpu-8g", "gpus": 8},
  ]
  assert out["local"] == {"gpus": 1, "replicas": 1, "volumes": {"/tmp/ki_xm": "/tmp/ki_xm"}}
  assert out["entrypoint"] == "ki.main"
