"""Checkpoints: one orbax CheckpointManager per run, under <workdir>/checkpoints/<step>/.

Items of a checkpoint:
  state   the full TrainState (params, optimizer state, step, rng, EMA), sharded as in training.
  params  {"params": params} alone (the EMA params when there is an EMA), in openpi's
          params-item layout, for serving and fine-tuning.
  assets  small files the policy needs next to the weights: norm stats, FAST tokenizer, config.
  data    the Grain iterator state of every host (grain's own orbax handler, one file per host).

Saving is asynchronous: `save` returns once the arrays are copied off the devices; the files are
written in the background and committed atomically, so a crash mid-write leaves the previous
checkpoint as the latest one.
"""

import dataclasses
import datetime
from typing import Any

from etils import epath
import grain.checkpoint
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
# Orbax drops this file into every item folder on non-atomic file systems; it is not an asset.
_ORBAX_COMMIT_MARKER = "commit_success.txt"


class AssetsHandler(ocp.CheckpointHandler):
  """Writes {relative path: bytes} as plain files, so that serving code can read them directly."""

  def save(self, directory: epath.Path, args: "AssetsSave"):
    if jax.process_index() != 0:
      return
    for name, content in args.files.items():
      path = epath.Path(directory) / name
      if ".." in epath.Path(name).parts:
        raise ValueError(f"Asset name {name!r} must stay inside the checkpoint.")
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(content)

  def restore(self, directory: epath.Path, args: "AssetsRestore | None" = None) -> dict[str, bytes]:
    files, pending = {}, [epath.Path(directory)]
    while pending:  # a walk by iterdir: epath refuses recursive globs (costly on GCS)
      for path in sorted(pending.pop().iterdir()):
        if path.is_dir():
          pending.append(path)
        elif path.name != _ORBAX_COMMIT_MARKER:
          files[str(path.relative_to(directory))] = path.read_bytes()
    return files


@ocp.args.register_with_handler(AssetsHandler, for_save=True)
@dataclasses.dataclass
class AssetsSave(ocp.args.CheckpointArgs):
  files: dict[str, bytes]


@ocp.args.register_with_handler(AssetsHandler, for_restore=True)
@dataclasses.dataclass
class AssetsRestore(ocp.args.CheckpointArgs):
  pass


def abstract_with_shardings(shapes, shardings):
  """ShapeDtypeStructs carrying the shardings orbax should restore into."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


class Checkpointer:
  """The run's checkpoints: save every `save_every` steps, keep the last `max_to_keep` plus every
  step divisible by `keep_period`, resume from the latest."""

  def __init__(
    self,
    workdir: str,
    *,
    save_every: int,
    max_to_keep: int = 3,
    keep_period: int | None = None,
    asynchronous: bool = True,
    save_params_item: bool = True,
  ):
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
    self.save_every = save_every
    self.save_params_item = save_params_item
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every,
      max_to_keep=max_to_keep,
      keep_period=keep_period,
      enable_async_checkpointing=asynchronous,
      # Leftover temporary folders from a run killed mid-write are removed on restart.
      cleanup_tmp_directories=True,
      async_options=ocp.AsyncOptions(timeout_secs=int(datetime.timedelta(hours=1).seconds)),
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self,
    step: int,
    state,
    *,
    data_iterator=None,
    assets: dict[str, bytes] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving `state` as checkpoint `step`; returns whether a save was started."""
    items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
    if self.save_params_item:
      # With an EMA, the averaged weights are the ones to serve (as openpi does).
      serving = state.params if state.ema_params is None else state.ema_params
      items["params"] = ocp.args.StandardSave({"params": serving})
    if assets:
      items["assets"] = AssetsSave(assets)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, *, data_iterator=None):
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs with
    shardings) and, when given, the data iterator in place. Returns the state."""
    items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_assets(self, step: int) -> dict[str, bytes]:
    return self.manager.restore(step, args=ocp.args.Composite(assets=AssetsRestore()))["assets"]

  def wait(self):
    """Blocks until the background writes are committed."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
