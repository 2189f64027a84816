"""Checkpoints: their layout on disk, finding the latest one, and the run's Checkpointer.

<workdir>/checkpoints/<step>/ holds these orbax items:
  params  {"params": tree}: the weights to serve and fine-tune from (the EMA params when the run
          keeps an EMA), in openpi's params-item layout, so that openpi, `ki.serve.policy` and
          `ki.model.weights` (kind "ki") read it as they read an openpi checkpoint. A LoRA run's
          adapters are merged into the weights they adapt (`ki.model.lora.merge`): the item is
          the plain pi0.5 tree, without adapter leaves.
  state   the rest of the TrainState, without a second copy of those weights (openpi's
          `_split_params`): with an EMA it keeps the raw params and drops ema_params; without one
          it drops params. `Checkpointer.restore` merges the params item back. With LoRA the
          served tree keeps only the leaves that merging leaves unchanged (SigLIP, embeddings,
          norms, projections), so the state keeps the rest of it unmerged: the adapters and the
          base weights they adapt. Resuming reads those from the state and everything else from
          the params item: exact, and nothing is stored twice.
  assets  small files the policy needs next to the weights: norm stats, tokenizer, config.json.
  data    the Grain iterator state of every host (grain's own orbax handler, one file per host).

Saving is asynchronous: `save` returns once the arrays are copied off the devices; the files are
written in the background and committed atomically (a "<step>.orbax-checkpoint-tmp-*" folder
renamed to "<step>", or a commit_success.txt file on object stores), so a crash mid-write leaves
the previous checkpoint as the latest one, and `latest_step` never picks a step being written.

Faults: a write that fails (disk full, workdir unwritable) raises CheckpointSaveError from the
next `save` or `wait`, naming the step, its path and the last committed step. `restore_newest_good`
resumes from the newest checkpoint that restores; damaged newer ones are logged with their
reason and moved to <workdir>/damaged_checkpoints/; none restoring raises
DamagedCheckpointsError, never a silent start from scratch over the workdir.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import datetime
import logging
from typing import Any

from etils import epath
import grain.checkpoint
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from ki.model import lora
from ki.model import params as params_lib

CHECKPOINT_DIR = "checkpoints"
PARAMS_ITEM = "params"
STATE_ITEM = "state"
ASSETS_ITEM = "assets"
DATA_ITEM = "data"
# Orbax drops this file into every item folder on non-atomic file systems; it is not an asset.
_ORBAX_COMMIT_MARKER = "commit_success.txt"
# Where a damaged checkpoint is moved once an older one restored, so that its step can be saved
# again: <workdir>/DAMAGED_DIR/<step>-<UTC time>/ (with a WHY_DAMAGED.txt).
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, workdir unwritable): training stops."""


class DamagedCheckpointsError(RuntimeError):
  """No checkpoint in the workdir can be restored: training refuses to start over it."""


def describe_error(error: BaseException) -> str:
  """One line of an exception for a log or an error message (orbax's run to pages)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else ""
  text = text if len(text) <= 300 else text[:300] + "..."
  return f"{type(error).__name__}: {text}"


def finished_steps(checkpoints_dir: str | epath.Path) -> list[int]:
  """The finished steps in a checkpoints/ folder, ascending. Orbax decides what is finished:
  in-progress folders (temporary names, or no commit marker on object stores) are skipped."""
  paths = ocp.utils.checkpoint_steps_paths(epath.Path(checkpoints_dir))
  return sorted(int(p.name) for p in paths if p.name.isdigit())


def latest_step(checkpoints_dir: str | epath.Path) -> int | None:
  """The largest finished step in a checkpoints/ folder, or None."""
  steps = finished_steps(checkpoints_dir)
  return steps[-1] if steps else None


def resolve_step_dir(path: str | epath.Path) -> epath.Path:
  """A step folder (<workdir>/checkpoints/<step>) as it is, or the latest finished step of a
  workdir or of its checkpoints/ folder. Raises FileNotFoundError saying what was looked for."""
  path = epath.Path(path)
  if (path / PARAMS_ITEM).is_dir() or (path / STATE_ITEM).is_dir():
    return path
  folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  if not folder.is_dir():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  step = latest_step(folder)
  if step is None:
    raise FileNotFoundError(
      f"no finished checkpoint under {folder}: expected <step>/ folders holding a "
      f"{PARAMS_ITEM!r} item (pass a step folder, a workdir or its {CHECKPOINT_DIR}/ folder)"
    )
  return folder / str(step)


# Under jit: the merged weights come out sharded like the weights they replace.
_merge = jax.jit(lora.merge, static_argnums=1)


def _served(params, model_config):
  """(the params item's tree, the part of `params` it cannot give back, or None).

  Without adapters: (params, None). With LoRA: (lora.merge(params), the adapters and the base
  weights they adapt, unmerged). Works on arrays (merged under jit) and on ShapeDtypeStructs with
  shardings (each merged weight restored into its base weight's sharding).
  """
  if model_config is None or not lora.has_lora(model_config):
    return params, None
  flat = params_lib.flatten(params)
  changed = lora.changed_by_merge(flat)
  unmerged = params_lib.unflatten({name: flat[name] for name in sorted(changed)})
  if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in flat.values()):
    shapes = jax.eval_shape(lambda p: lora.merge(p, model_config), params)
    merged = params_lib.map_with_names(
      lambda name, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat[name].sharding), shapes
    )
  else:
    merged = _merge(params, model_config)
  return merged, unmerged


def split_params(state, model_config=None):
  """(the state item's TrainState, the params item's tree): the weights are stored once.

  model_config: the model the params belong to; with LoRA adapters the params item holds them
    merged and the state keeps them (and the weights they adapt) unmerged.
  """
  if state.ema_params is not None:
    served, unmerged = _served(state.ema_params, model_config)
    return state.replace(ema_params=unmerged), served
  served, unmerged = _served(state.params, model_config)
  return state.replace(params=unmerged), served


def merge_params(train_state, params, *, ema: bool):
  """Undoes `split_params`; `ema` says whether `params` are the EMA params. Leaves the state item
  kept unmerged (a LoRA run's adapters and the weights they adapt) replace the merged ones."""
  unmerged = train_state.ema_params if ema else train_state.params
  if unmerged is not None:
    flat = params_lib.flatten(params)
    flat.update(params_lib.flatten(unmerged))
    params = params_lib.unflatten(flat)
  if ema:
    return train_state.replace(ema_params=params)
  return train_state.replace(params=params)


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
  """The run's checkpoints: keeps the last `max_to_keep` plus every step divisible by
  `keep_period`, resumes from the latest. When to save is the caller's decision: every `save`
  call writes a checkpoint unless that step is already saved.

  model_config: the pi05.Config of the state's params; needed only when it has LoRA adapters
  (the params item then holds them merged, see the module docstring).
  """

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int = 3,
    keep_period: int | None = None,
    asynchronous: bool = True,
    model_config=None,
  ):
    self.model_config = model_config
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period,
      enable_async_checkpointing=asynchronous,
      # Leftover temporary folders from a run killed mid-write are removed on restart.
      cleanup_tmp_directories=True,
      async_options=ocp.AsyncOptions(timeout_secs=int(datetime.timedelta(hours=1).seconds)),
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving_step = None  # the step whose checkpoint is being written in the background

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
    """Starts saving `state` (a TrainState) as checkpoint `step`; returns whether a save was
    started. `force` saves even where orbax's policies would skip the step."""
    train_state, params = split_params(state, self.model_config)
    items: dict[str, Any] = {
      STATE_ITEM: ocp.args.StandardSave(train_state),
      PARAMS_ITEM: ocp.args.StandardSave({"params": params}),
    }
    if assets:
      items[ASSETS_ITEM] = AssetsSave(assets)
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    # A failure of the previous background write surfaces here, named as that step's (orbax's
    # save would wait for it too, after its hosts' sync for this step).
    self.wait()
    self._saving_step = step
    with self._reporting_save_errors():
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if not saved:
      self._saving_step = None
    return saved

  def restore(self, step: int, abstract_state, *, data_iterator=None):
    """The full TrainState of checkpoint `step`, restored into the shardings of `abstract_state`
    (a TrainState of ShapeDtypeStructs with shardings, e.g. from `abstract_with_shardings`),
    and, when given, the data iterator's position, in place."""
    train_target, params_target = split_params(abstract_state, self.model_config)
    items: dict[str, Any] = {
      STATE_ITEM: ocp.args.StandardRestore(train_target),
      PARAMS_ITEM: ocp.args.StandardRestore({"params": params_target}),
    }
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return merge_params(
      restored[STATE_ITEM],
      restored[PARAMS_ITEM]["params"],
      ema=abstract_state.ema_params is not None,
    )

  def restore_newest_good(
    self,
    abstract_state,
    *,
    data_iterator=None,
    check_assets: Callable[[epath.Path, dict[str, bytes]], None] | None = None,
  ):
    """The TrainState of the newest checkpoint that restores (as `restore`), or None when there
    is no checkpoint.

    A checkpoint that fails to restore (a file truncated or deleted on a shared file system, a
    node lost while orbax wrote it outside its atomic commit) is logged loudly with its reason
    and the next older one is tried. Once one restores, the damaged newer ones are moved to
    <workdir>/damaged_checkpoints/ (so their steps can be saved again; nothing is deleted). When
    none restores, DamagedCheckpointsError: never a start from scratch over a workdir that has
    checkpoints.

    check_assets: called with (step folder, its assets) before the state is read; raising
      refuses the checkpoint (the trainer's `ki.train.resume.check_resumable`: a changed setting
      the checkpoint cannot continue with is the user's decision, not damage), and the error
      propagates: nothing is restored, nothing is called damaged or moved.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        assets = self.restore_assets(step)
      except Exception as error:  # pylint: disable=broad-except
        damaged.append((step, f"its assets do not restore: {describe_error(error)}"))
        logging.error("Checkpoint %d in %s is damaged: %s", step, self.directory, damaged[-1][1])
        continue
      if check_assets is not None:
        check_assets(self.directory / str(step), assets)
      try:
        state = self.restore(step, abstract_state, data_iterator=data_iterator)
      except Exception as error:  # pylint: disable=broad-except
        damaged.append((step, describe_error(error)))
        logging.error("Checkpoint %d in %s is damaged: %s", step, self.directory, damaged[-1][1])
        continue
      if damaged:
        self._set_aside(damaged)
        logging.error(
          "RESUMING FROM AN OLDER CHECKPOINT: step %d, the newest that restores (damaged: %s, "
          "moved to %s). Steps %d to %d are trained again.",
          step,
          ", ".join(str(s) for s, _ in damaged),
          self.directory.parent / DAMAGED_DIR,
          step + 1,
          damaged[0][0],
        )
      else:
        logging.info("Resuming from checkpoint %d in %s.", step, self.directory)
      return state
    if damaged:
      raise DamagedCheckpointsError(
        f"No checkpoint in {self.directory} restores:\n"
        + "".join(f"  step {s}: {reason}\n" for s, reason in damaged)
        + f"Refusing to train from scratch over the workdir {self.directory.parent}. Restore "
        f"the checkpoints from a copy, or move {self.directory} away (e.g. mv {self.directory} "
        f"{self.directory}.damaged) to start this workdir from scratch, or use a new --workdir."
      )
    return None

  def _set_aside(self, damaged: list[tuple[int, str]]):
    """Moves damaged step folders out of orbax's directory (process 0; the others wait)."""
    if jax.process_index() == 0:
      target = self.directory.parent / DAMAGED_DIR
      target.mkdir(parents=True, exist_ok=True)
      stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
      for step, reason in damaged:
        destination = target / f"{step}-{stamp}"
        (self.directory / str(step)).rename(destination)
        (destination / "WHY_DAMAGED.txt").write_text(reason + "\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ki_damaged_checkpoints_set_aside")
    self.manager.reload()

  def restore_assets(self, step: int) -> dict[str, bytes]:
    restored = self.manager.restore(step, args=ocp.args.Composite(**{ASSETS_ITEM: AssetsRestore()}))
    return restored[ASSETS_ITEM]

  def wait(self):
    """Blocks until the background writes are committed."""
    with self._reporting_save_errors():
      self.manager.wait_until_finished()
    self._saving_step = None

  @contextlib.contextmanager
  def _reporting_save_errors(self):
    """Turns a failed checkpoint write (disk full, workdir unwritable, quota) into one error
    naming the step and its path, and saying what is intact and what to run next. A collective
    between the processes that fails while saving is a lost process, not a full disk."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      step = self._saving_step
      latest = latest_step(self.directory)
      intact = (
        f"The last committed checkpoint, step {latest}, is intact"
        if latest is not None
        else "No checkpoint was committed yet"
      )
      if isinstance(error, jax.errors.JaxRuntimeError) and jax.process_count() > 1:
        raise CheckpointSaveError(
          f"Could not save checkpoint {step if step is not None else '(unknown step)'}: a "
          f"collective between the {jax.process_count()} processes failed "
          f"({describe_error(error)}), so another process has stopped or cannot be reached. "
          "jax's coordination service ends this process too; its 'Terminating process' line "
          "says what was lost ('the leader task' is the coordinator, process 0). "
          f"{intact}. Restart every process with the same command: they "
          + ("resume from it." if latest is not None else "start from the beginning.")
        ) from error
      raise CheckpointSaveError(
        f"Could not write checkpoint {step if step is not None else '(unknown step)'} to "
        f"{self.directory / str(step)}: {describe_error(error)}. {intact}; the unfinished one "
        f"is removed on the next start. Free space in (or restore write access to) "
        f"{self.directory} and rerun the same command to resume."
      ) from error

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
