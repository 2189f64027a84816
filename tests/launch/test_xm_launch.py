"""The XManager launcher (launch/xm_launch.py): the per-node ki.main arguments it builds
(launch/xm_jobs.py, no xmanager needed) and that ki.main's own flags accept them. The launcher
itself is only imported where xmanager is installed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/droid_ki.py:smoke"
OVERRIDES = ["data.arrayrecord_dir=gs://bucket/droid_ar/train", "init.path=gs://bucket/vlm",
             "total_steps=7", "model.fast_loss=false"]


def _load(name):
  """launch/ is a folder of scripts, not a package: load a file of it by path."""
  spec = importlib.util.spec_from_file_location(f"launch_{name}",
                                                os.path.join(REPO, "launch", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


xm_jobs = _load("xm_jobs")

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
  "total_steps": config.total_steps, "fast_loss": config.model.fast_loss,
  "locked": config.is_locked}))
"""


def _ki_main_parse(argv):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  result = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_node_runs_ki_main_without_distributed_flags():
  [job] = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://bucket/ki",
                            overrides=OVERRIDES, accelerator="h100", accelerators_per_node=8)
  assert job.name == "node_0"
  assert job.requirements == {"h100": 8}
  assert xm_jobs.to_argv(job.args) == [
    f"--config={CONFIG}", "--workdir=gs://bucket/ki",
    "--config.data.arrayrecord_dir=gs://bucket/droid_ar/train",
    "--config.init.path=gs://bucket/vlm",
    "--config.total_steps=7", "--config.model.fast_loss=false"]


def test_four_nodes_share_the_coordinator_and_count_and_differ_in_index():
  jobs = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://bucket/ki",
                           overrides=OVERRIDES, nodes=4, accelerator="a100",
                           accelerators_per_node=8)
  assert [job.name for job in jobs] == ["node_0", "node_1", "node_2", "node_3"]
  for index, job in enumerate(jobs):
    assert job.requirements == {"a100": 8}
    # Vertex's CLUSTER_SPEC workerpool0 entry is already host:port: nothing is appended.
    assert job.args["coordinator_address"] == "%objectname(workerpool0)%"
    assert job.args["num_processes"] == 4
    assert job.args["process_id"] == index
    assert xm_jobs.to_argv(job.args)[:6] == xm_jobs.to_argv(jobs[0].args)[:6]


def test_local_is_one_node_without_requirements_unless_asked():
  [job] = xm_jobs.node_jobs(executor="local", config=CONFIG, workdir="/tmp/ki_xm")
  assert job.args == {"config": CONFIG, "workdir": "/tmp/ki_xm"}
  assert job.requirements == {}
  # xmanager's local executor only passes GPUs into the container for `local_gpu`.
  [job] = xm_jobs.node_jobs(executor="local", config=CONFIG, workdir="/tmp/ki_xm",
                            accelerator="a100", accelerators_per_node=2)
  assert job.requirements == {"local_gpu": 2}


def test_vertex_asks_for_eight_accelerators_by_default():
  [job] = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://b/ki",
                            accelerator="a100")
  assert job.requirements == {"a100": 8}


@pytest.mark.parametrize("kwargs, message", [
  ({"overrides": ["no_equals_sign"]}, "key=value"),
  ({"overrides": ["=1"]}, "key=value"),
  ({"overrides": ["config.total_steps=1"]}, "without the 'config.' prefix"),
  ({"nodes": 0}, "at least 1"),
  ({"nodes": 5}, "at most 4 worker pools"),
  ({"executor": "local", "nodes": 2}, "one container"),
  ({"executor": "slurm"}, "not one of"),
  ({"workdir": ""}, "workdir is required"),
  ({"overrides": ["data.mixture=[a,b]"]}, "drops"),
  ({"overrides": ["init.path=/a b"]}, "drops"),
  ({"accelerator": None, "accelerators_per_node": 8}, "needs an accelerator name"),
  ({"accelerators_per_node": -1}, ">= 0"),
])
def test_bad_requests_are_refused(kwargs, message):
  request = {"executor": "vertex", "config": CONFIG, "workdir": "gs://b/ki", **kwargs}
  with pytest.raises(ValueError, match=message):
    xm_jobs.node_jobs(**request)


def test_ki_main_accepts_the_single_node_argv():
  [job] = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://bucket/ki",
                            overrides=OVERRIDES)
  seen = _ki_main_parse(xm_jobs.to_argv(job.args))
  assert seen == {"rest": [], "workdir": "gs://bucket/ki", "distributed": [],
                  "arrayrecord_dir": "gs://bucket/droid_ar/train", "init_path": "gs://bucket/vlm",
                  "total_steps": 7, "fast_loss": False, "locked": True}


@pytest.mark.parametrize("index", [0, 3])
def test_ki_main_accepts_a_multi_node_argv_and_initializes_jax_distributed(index):
  # At run time xmanager's wrapper has replaced the late binding with CLUSTER_SPEC's entry.
  jobs = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://bucket/ki",
                           overrides=OVERRIDES, nodes=4)
  argv = [arg.replace(xm_jobs.VERTEX_COORDINATOR, "cmle-training-workerpool0-ab-0:2222")
          for arg in xm_jobs.to_argv(jobs[index].args)]
  seen = _ki_main_parse(argv)
  assert seen["rest"] == []
  assert seen["distributed"] == [{"coordinator_address": "cmle-training-workerpool0-ab-0:2222",
                                  "num_processes": 4, "process_id": index}]
  assert seen["total_steps"] == 7 and seen["fast_loss"] is False


def test_ki_main_refuses_an_unknown_override():
  [job] = xm_jobs.node_jobs(executor="vertex", config=CONFIG, workdir="gs://bucket/ki",
                            overrides=["no_such_field=1"])
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  result = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(xm_jobs.to_argv(job.args))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "no_such_field" in result.stderr


# Runs where xmanager is installed (it is not a dependency of ki): loads the real launcher, which
# defines its absl flags on import, so in a subprocess. Builds the xm.Jobs of a 2-node Vertex
# launch, renders their container arguments as xmanager's Vertex client does, resolves the late
# binding as xmanager's image wrapper does, and picks the Vertex machine type.
_REAL_LAUNCHER = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "launch"))
import xm_launch, xm_jobs
from xmanager import xm
from xmanager.cloud import utils as cloud_utils, vertex
from xmanager.xm import utils as xm_utils
from xmanager.xm_local import executables
executable = executables.GoogleContainerRegistryImage(name="ki", image_path="gcr.io/p/ki:t")
jobs = {}
for job in xm_jobs.node_jobs(executor="vertex", config="experiments/droid_ki.py:smoke",
                             workdir="gs://b/ki", nodes=2, accelerator="a100"):
  jobs[job.name] = xm.Job(executable=executable, executor=xm_launch.to_executor(job, "vertex"),
                          args=xm_launch.to_xm_args(job))
group = xm.JobGroup(**jobs)
os.environ["CLUSTER_SPEC"] = json.dumps({"cluster": {"workerpool0": ["host0:2222"],
                                                     "workerpool1": ["host1:2222"]},
                                         "task": {"type": "workerpool1", "index": 0}})
out = {}
for name, job in group.jobs.items():
  argv = xm.merge_args(executable.args, job.args).to_list(xm_utils.ARGV_ESCAPER)
  spec = vertex.get_machine_spec(job)
  out[name] = {"argv": cloud_utils.map_workerpool_address_args(argv),
               "machine_type": spec["machine_type"], "gpus": spec["accelerator_count"]}
[local] = xm_jobs.node_jobs(executor="local", config="experiments/droid_ki.py:smoke",
                            workdir="/tmp/ki_xm", accelerators_per_node=1)
executor = xm_launch.to_executor(local, "local")
out["local"] = {"gpus": executor.requirements.task_requirements[xm.ResourceType.LOCAL_GPU],
                "volumes": executor.docker_options.volumes}
spec = xm_launch.executable_spec("python:3.11", xm_launch.REPO)
out["entrypoint"] = spec.entrypoint.module_name
print(json.dumps(out))
"""


def test_the_real_launcher_builds_vertex_jobs_with_xmanager():
  pytest.importorskip("xmanager")
  result = subprocess.run([sys.executable, "-c", _REAL_LAUNCHER, REPO], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for index in range(2):
    node = out[f"node_{index}"]
    assert node["argv"] == ["--config=experiments/droid_ki.py:smoke", "--workdir=gs://b/ki",
                            "--coordinator_address=host0:2222", "--num_processes=2",
                            f"--process_id={index}"]
    assert node["machine_type"] == "a2-highgpu-8g" and node["gpus"] == 8
  assert out["local"] == {"gpus": 1, "volumes": {"/tmp/ki_xm": "/tmp/ki_xm"}}
  assert out["entrypoint"] == "ki.main"
