"""Which config fields may change when a run resumes, decided before any checkpoint is read.

A workdir resumes from its newest checkpoint, and the config it resumes with may differ from the
one saved with it (`<step>/assets/config.json`). Some changes are what users do on purpose: a
longer run, another learning rate, other eval or checkpoint cadences. Others make the checkpoint
unreadable as this run's state (the model's shapes, EMA on/off, frozen groups, LoRA, the clip
transform on/off and where it sits) or make its saved data position meaningless (the data
stream's settings). Without this check the second kind surfaced as orbax failing to restore every
checkpoint, which the trainer then had to call damage.

`RULES` classifies every field of `ki.train.config.default_config()` (a test checks that none is
missing); `check_resumable` compares the saved config with the current one and refuses a breaking
change naming each field and the two ways out, or returns the safe changes for one log line.
"""

from collections.abc import Callable
import dataclasses
import json
from typing import Any

_ABSENT = object()


@dataclasses.dataclass(frozen=True)
class Rule:
  """How changing the fields `pattern` names affects a resume.

  pattern: a dotted field name; "*" stands for any one name (an optimizer group's); a pattern
    ending in "." covers that group and everything below it, fields added later included.
  breaks: whether a change makes the checkpoint unusable for this run.
  why: what the field decides, for the messages.
  structure: for a field that breaks only through part of its value, that part (e.g. whether
    the EMA is on, not its decay): a change that keeps it is safe.
  absent: for a breaking field added after checkpoints were written, the value those runs had
    in effect (e.g. the clip was global before `optimizer.clip` existed): such a checkpoint
    counts as saved with it, so a run that keeps that value still resumes.
  """

  pattern: str
  breaks: bool
  why: str
  structure: Callable[[Any], Any] | None = None
  absent: Any = _ABSENT

  def matches(self, field: str) -> bool:
    if self.pattern.endswith("."):
      return field == self.pattern[:-1] or field.startswith(self.pattern)
    parts, names = self.pattern.split("."), field.split(".")
    return len(parts) == len(names) and all(p in ("*", n) for p, n in zip(parts, names))


def _safe(pattern: str, why: str) -> Rule:
  return Rule(pattern, False, why)


def _breaks(pattern: str, why: str, structure=None, absent=_ABSENT) -> Rule:
  return Rule(pattern, True, why, structure, absent)


_DATA = "the data stream whose position the checkpoint saved"

# First match wins. Breaking = changes the train state's structure or shapes (so orbax could not
# restore it), what its weights are, or the data stream whose position the checkpoint holds.
RULES = (
  # How long and how fast: the schedules read the step count from the state, nothing else.
  _safe("total_steps", "the run's length"),
  _safe("optimizer.groups.*.peak_lr", "a learning-rate schedule"),
  _safe("optimizer.groups.*.end_lr", "a learning-rate schedule"),
  _safe("optimizer.groups.*.warmup_steps", "a learning-rate schedule"),
  _safe("optimizer.groups.*.decay_steps", "a learning-rate schedule"),
  _safe("optimizer.groups.*.b1", "AdamW's settings (same state)"),
  _safe("optimizer.groups.*.b2", "AdamW's settings (same state)"),
  _safe("optimizer.groups.*.eps", "AdamW's settings (same state)"),
  _safe("optimizer.groups.*.weight_decay", "AdamW's settings (same state)"),
  _breaks("optimizer.groups.*.frozen", "a frozen group has no optimizer state"),
  _breaks("optimizer.groups.*", "each optimizer group has its own optimizer state"),
  _breaks("optimizer.group_rules", "which parameters each optimizer group's state covers"),
  _breaks(
    "optimizer.clip_norm", "turning the clip on or off changes the optimizer state", structure=bool
  ),
  # Global: one clip before the groups; per group: one inside each group's chain.
  _breaks(
    "optimizer.clip",
    "where the clip sits in the optimizer changes the optimizer state's structure",
    absent="global",
  ),
  _breaks(
    "optimizer.ema_decay",
    "the state holds EMA weights only when it is set",
    structure=lambda decay: decay is not None,
  ),
  _safe("loss.", "the loss weights"),
  # Micro-batches are a loop inside one step: no state of their own.
  _safe("grad_accum_steps", "how one step's batch is split"),
  # The same state laid out over other devices: orbax restores into any sharding.
  _safe("mesh", "the device layout"),
  _safe("fsdp_min_size_bytes", "the device layout"),
  _safe("compilation_cache_dir", "a cache location"),
  _safe("log_every", "the logging cadence"),
  _safe("checkpoint.", "the checkpoint cadence"),
  _safe("eval.", "the evaluation"),
  _safe("init.", "how a run starts from scratch (not read when resuming)"),
  _safe("assets.", "file locations"),
  # How the same model is computed.
  _safe("model.dtype", "the compute dtype"),
  _safe("model.remat_policy", "rematerialisation"),
  _safe("model.attention_impl", "the attention kernel"),
  _safe("model.max_token_len", "the prompt length (no learned positions)"),
  _safe("model.max_loss_tokens", "the positions that get logits"),
  _breaks("model.", "the model the checkpoint's weights belong to"),
  # The data stream: the checkpoint holds its position (Grain's iterator state).
  _breaks("seed", _DATA),
  _breaks("batch_size", _DATA),
  _safe("data.arrayrecord_dir", "a data location"),
  _safe("data.rlds_dir", "a data location"),
  _safe("data.lerobot_dir", "a data location"),
  _safe("data.keep_ranges_path", "a data location"),
  _safe("data.eval_arrayrecord_dir", "the evaluation data"),
  _safe("data.rlds_eval_split", "the evaluation data"),
  _safe("data.augment", "the image augmentation"),
  _safe("data.skip_unreadable_records", "what an unreadable record does"),
  _safe("data.worker_buffer_size", "prefetching"),
  _safe("data.read_threads", "prefetching"),
  _safe("data.read_buffer_size", "prefetching"),
  _breaks("data.", _DATA),
  _safe("synthetic_data.dir", "a data location"),
  _breaks("synthetic_data.", _DATA),
)


def rule_for(field: str) -> Rule | None:
  """The rule that classifies `field` (a dotted name), or None when no rule does."""
  return next((rule for rule in RULES if rule.matches(field)), None)


class ResumeConfigError(ValueError):
  """The config changed a field that the checkpoint cannot resume with; nothing was restored."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _changed_fields(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, current value)} of every difference; a group present on one side only
  is one entry under its own name (its value the whole group), not one per field."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  changes = {}
  for name in sorted(set(saved_flat) | set(current_flat)):
    old, new = saved_flat.get(name, _ABSENT), current_flat.get(name, _ABSENT)
    if old == new:
      continue
    if old is _ABSENT or new is _ABSENT:
      # The outermost group that one side lacks.
      side = saved if old is _ABSENT else current
      parts = name.split(".")
      for depth in range(1, len(parts) + 1):
        node = side
        for part in parts[:depth]:
          node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
          break
      group = ".".join(parts[:depth])
      old = _value_at(saved, group)
      new = _value_at(current, group)
      name = group
    changes[name] = (old, new)
  return changes


def _value_at(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return _ABSENT
    tree = tree[part]
  return tree


def _show(value) -> str:
  if value is _ABSENT:
    return "absent"
  return "present" if isinstance(value, dict) else repr(value)


def _describe(field: str, old, new, why: str | None = None) -> str:
  text = f"{field}: {_show(old)} in the checkpoint, {_show(new)} now"
  return f"{text} ({why})" if why else text


def check_resumable(
  saved_config_json: str | bytes, config_json: str | bytes, checkpoint_dir: str
) -> list[str]:
  """Compares the config a checkpoint was saved with to the current one (both as the JSON of a
  checkpoint's assets/config.json), field by field through `RULES`.

  Returns:
    one line per safe change ("field: old in the checkpoint, new now"), for the log.
  Raises:
    ResumeConfigError: naming every breaking change (a field no rule classifies counts as one)
      and the two ways out: put them back, or start a new workdir from the checkpoint's weights.
  """
  changes = _changed_fields(json.loads(saved_config_json), json.loads(config_json))
  safe, breaking = [], []
  for field, (old, new) in changes.items():
    rule = rule_for(field)
    if rule is None:
      breaking.append(_describe(field, old, new, "not classified in ki.train.resume.RULES"))
      continue
    why = rule.why
    if old is _ABSENT and rule.absent is not _ABSENT:
      if rule.absent == new:
        continue  # the value the checkpoint's run had, before the field existed
      old, why = rule.absent, f"{why}; saved before the field existed, when it was {rule.absent!r}"
    breaks = rule.breaks
    if breaks and rule.structure is not None and _ABSENT not in (old, new):
      breaks = rule.structure(old) != rule.structure(new)
    if breaks:
      breaking.append(_describe(field, old, new, why))
    else:
      safe.append(_describe(field, old, new))
  if breaking:
    raise ResumeConfigError(
      f"Cannot resume from {checkpoint_dir}: settings it cannot continue with were changed:\n  "
      + "\n  ".join(breaking)
      + "\nThe checkpoint is intact and nothing was restored. Either put these settings back "
      "(its assets/config.json holds them all) and rerun, or start a new --workdir from its "
      f"weights: --config.init.kind=ki --config.init.path={checkpoint_dir}"
    )
  return safe
