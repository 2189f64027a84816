"""Pretrained weights in three checkpoint formats, checked against the model's parameter tree.

  openpi     an openpi checkpoint folder (e.g. gs://openpi-assets/checkpoints/pi05_base or a step
             folder of an openpi run): `<dir>/params` is an orbax PyTree item {"params": tree} in
             openpi's layout; trees saved during openpi training wrap every leaf as {"value": x}
             (nnx.State), which is unwrapped here as openpi's `restore_params` does.
  paligemma  a big_vision PaliGemma .npz: flat keys "params/img/..." and "params/llm/..." joined
             by "/"; it fills the VLM (PaliGemma/img, PaliGemma/llm without the expert's "_1"
             weights) and the action expert keeps its fresh initialisation.
  ki         a checkpoint of ours (ki/checkpoint.py): a workdir (its latest finished step), a
             checkpoints/<step> folder, or its params item; the same {"params": tree} layout as
             openpi's (the EMA params when the run kept an EMA).

`load` returns {name: np.ndarray} for the leaves it provides ("/"-joined names) after comparing
every leaf with the expected shapes and dtypes; all mismatches are reported in one error. A LoRA
model's adapters are never in the checkpoint: they keep their fresh initialisation.
"""

from collections.abc import Mapping
import re

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from ki import checkpoint
from ki.model import params as params_lib

FORMATS = ("openpi", "paligemma", "ki")


class WeightsMismatchError(ValueError):
  pass


def _unwrap_nnx_values(flat: dict[str, object]) -> dict[str, object]:
  """Drops the trailing "/value" that nnx.State adds to every leaf, if all leaves have it."""
  if flat and all(name.endswith("/value") for name in flat):
    return {name[: -len("/value")]: leaf for name, leaf in flat.items()}
  return flat


def _restore_params_item(params_dir: epath.Path) -> dict[str, np.ndarray]:
  """Reads an orbax {"params": tree} item as host numpy arrays, whatever sharding it was saved
  with (restore_type=np.ndarray needs no devices)."""
  if not params_dir.exists():
    raise FileNotFoundError(f"No params item at {params_dir}.")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(params_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    if "params" not in tree:
      raise WeightsMismatchError(
        f"{params_dir} holds {sorted(tree)} at its top level, not the expected 'params'."
      )
    item = {"params": tree["params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(
      params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
    )
  return _unwrap_nnx_values(params_lib.flatten(restored["params"]))


def _openpi_params_dir(path: str) -> epath.Path:
  path = epath.Path(path)
  return path / "params" if (path / "params").exists() else path


def _ki_params_dir(path: str) -> epath.Path:
  """A params item, or that of a step folder, of a workdir's or a checkpoints/ folder's latest
  finished step (ki.checkpoint.resolve_step_dir)."""
  path = epath.Path(path)
  if path.name == checkpoint.PARAMS_ITEM and not (path / checkpoint.PARAMS_ITEM).exists():
    return path
  return checkpoint.resolve_step_dir(path) / checkpoint.PARAMS_ITEM


def _read_paligemma_npz(path: str) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f:
    flat = dict(np.load(f, allow_pickle=False))
  prefix = "params/"
  stray = [k for k in flat if not k.startswith(prefix)]
  if stray:
    raise WeightsMismatchError(
      f"{path}: keys {stray[:5]} do not start with {prefix!r}; not a big_vision PaliGemma .npz."
    )
  return {"PaliGemma/" + k[len(prefix) :]: v for k, v in flat.items()}


def check_against(
  loaded: Mapping[str, np.ndarray],
  expected: Mapping[str, jax.ShapeDtypeStruct],
  *,
  allowed_missing: re.Pattern | None,
  cast_dtypes: bool,
  source: str,
) -> dict[str, np.ndarray]:
  """Compares names, shapes and dtypes; returns the loaded leaves (cast if allowed).

  Raises WeightsMismatchError listing every missing, unexpected, mis-shaped and mis-typed leaf.
  """
  problems = []
  missing = [
    n
    for n in expected
    if n not in loaded and not (allowed_missing and allowed_missing.fullmatch(n))
  ]
  unexpected = [n for n in loaded if n not in expected]
  problems += [f"missing: {n} {tuple(expected[n].shape)} {expected[n].dtype}" for n in missing]
  problems += [f"unexpected: {n} {tuple(np.shape(loaded[n]))}" for n in unexpected]
  result = {}
  for name, value in loaded.items():
    if name not in expected:
      continue
    want = expected[name]
    value = np.asarray(value)
    if tuple(value.shape) != tuple(want.shape):
      problems.append(
        f"shape: {name} is {tuple(value.shape)} in the checkpoint, the model "
        f"expects {tuple(want.shape)}"
      )
      continue
    if value.dtype != want.dtype:
      both_float = (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16") and (
        np.issubdtype(want.dtype, np.floating) or np.dtype(want.dtype).name == "bfloat16"
      )
      if not (cast_dtypes and both_float):
        problems.append(
          f"dtype: {name} is {value.dtype} in the checkpoint, the model expects {want.dtype}"
        )
        continue
      value = value.astype(want.dtype)
    result[name] = value
  if problems:
    raise WeightsMismatchError(
      f"{len(problems)} mismatch(es) between {source} and the model:\n  " + "\n  ".join(problems)
    )
  return result


def load(
  kind: str, path: str, abstract_params, *, cast_dtypes: bool = False
) -> dict[str, np.ndarray]:
  """Loads checkpoint `path` of format `kind` for a model whose params look like
  `abstract_params` (a tree of ShapeDtypeStructs, e.g. ki.train.state.abstract_params(config)).

  Returns {name: array} for every leaf the checkpoint provides (all of them, except the expert's
  for "paligemma").
  """
  expected = params_lib.flatten(abstract_params)
  # LoRA adapters are never in a pretrained checkpoint (openpi's and ours hold the merged plain
  # layout): a LoRA model keeps their fresh initialisation, as openpi's LoRA fine-tuning does.
  allowed_missing = [params_lib.LORA_REGEX]
  if kind == "openpi":
    loaded = _restore_params_item(_openpi_params_dir(path))
  elif kind == "ki":
    loaded = _restore_params_item(_ki_params_dir(path))
  elif kind == "paligemma":
    loaded = _read_paligemma_npz(path)
    allowed_missing.append(params_lib.EXPERT_REGEX)
  else:
    raise ValueError(f"Unknown weights format {kind!r}; expected one of {FORMATS}.")
  return check_against(
    loaded,
    expected,
    allowed_missing=re.compile("|".join(f"(?:{regex})" for regex in allowed_missing)),
    cast_dtypes=cast_dtypes,
    source=f"{kind} checkpoint {path}",
  )


def merge_into(params, loaded: Mapping[str, np.ndarray]):
  """Replaces the leaves of a (device) params tree by the loaded ones, keeping each leaf's
  sharding. Returns the new tree."""

  def replace(name, leaf):
    if name not in loaded:
      return leaf
    return jax.device_put(loaded[name], leaf.sharding)

  return params_lib.map_with_names(replace, params)
