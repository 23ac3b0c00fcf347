"""Recipes: TOML files that compose components, loaded strictly and resolved against the registry.

Loading runs in three passes, and every problem of all three is reported in one `RecipeError`
(three typos: three lines):
  1. read the file and its `extends` chain, merge, apply `--set` overrides;
  2. structure the result into the frozen `Recipe` classes below, with one `ComponentSpec`
     field per component slot (`dis_core.contract.slots`: `[task]`, `[[evaluators]]`, `[train.optimizer]`);
  3. look up each component's name in the registry and structure its `config` table into
     that component's own config class, making its relative paths absolute; then check what a
     run would refuse at its start (the batch split, the `[deepspeed]` table: `dis_core.wiring.deepspeed_table`).
Pass 3 reads the components from the raw tables, so it runs whatever pass 2 found (an unknown
key, a wrong type, a value out of range); only a file that cannot be read or merged (bad TOML, a
broken `extends` chain) stops loading at pass 1. A bad `--set` is reported with the rest.
The result, `ResolvedRecipe`, is what the trainer builds from and what every run saves.

One path rule: a relative path in a recipe (a `Path` field of a config class, and `extends`) is
relative to the file that writes it; one given with `--set` is relative to the current directory.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import attrs

from dis_core.wiring.config import converter, structure, unstructure
from dis_core.contract.errors import RecipeError, UnknownComponentError
from dis_core.contract.slots import SLOTS, Slot, parts, value_at
from dis_core.contract.validators import finite, in_range, non_negative, positive, probability

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.frozen(kw_only=True)
class ComponentSpec:
    """A `[section]` naming a registered component and the table for its config class."""

    name: str
    config: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Schedule:
    warmup_steps: int = attrs.field(default=0, validator=non_negative)  # linear warm-up from lr/warmup (the reference's first step) to lr
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = attrs.field(default=1.0, validator=probability)  # cosine floor as a fraction of lr; 1.0 == constant (the reference default)


MAX_SEED = 2**32 - 1  # the trainer derives generator seeds from it (seed * 1_000_003 + rank must fit 64 bits)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhd]))+")


def parse_duration(text: str) -> float | None:
    """Seconds of "90s", "30m", "2h", "1h30m", "1.5d"; None for "off" (or "0"). ValueError otherwise."""
    text = text.strip().lower()
    if text in ("off", "0"):
        return None
    if not _DURATION.fullmatch(text):
        raise ValueError(f'expected a duration such as "90s", "30m", "2h" or "1h30m", or "off", got {text!r}')
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", text))
    if seconds <= 0:
        raise ValueError(f'a duration must be longer than 0 (use "off" to turn it off), got {text!r}')
    return seconds


Duration = typing.NewType("Duration", str)  # "30m": a string, so that a bare number is not taken for seconds or minutes


def _structure_duration(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        seconds = f' (in seconds: "{value}s")' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise TypeError(f'expected a duration string such as "30m"{seconds}, got {type(value).__name__} {value!r}')
    return value


converter.register_structure_hook(Duration, _structure_duration)


def _duration(_inst, attr, value) -> None:
    try:
        parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{attr.name}: {exc}") from None


# int, "auto" or None: cattrs cannot structure that union by itself, so the one converter learns it
# here, as strictly as its other hooks (a quoted number or another word is an error).
MicroBatch = int | Literal["auto"] | None


def _structure_micro_batch(value: Any, _type: type) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'expected an integer or "auto", got {type(value).__name__} {value!r}')
    return value


converter.register_structure_hook(MicroBatch, _structure_micro_batch)


def _micro_batch(inst, attr, value) -> None:
    if value != "auto":
        positive(inst, attr, value)


@attrs.frozen(kw_only=True)
class Train:
    seed: int = attrs.field(default=0, validator=in_range(0, MAX_SEED))
    global_batch_size: int = attrs.field(validator=positive)  # examples per optimizer step, all ranks together
    steps: int | None = attrs.field(default=None, validator=positive)  # optimizer (= supervision) steps
    epochs: float | None = attrs.field(default=None, validator=positive)  # or: passes over the train split
    eval_interval: int = attrs.field(default=0, validator=non_negative)  # optimizer steps between evaluations; 0 = only at the end
    checkpoint_interval: int = attrs.field(default=0, validator=non_negative)  # optimizer steps between checkpoints; 0 = only at the end
    # And by wall time ("90s", "30m", "2h", "1h30m"; "off"): a stopped run then never loses more
    # than this much work, however long its steps. Runs shorter than it never reach it.
    checkpoint_every: Duration = attrs.field(default="30m", validator=_duration)
    # Retention: keep the newest N complete checkpoints (0 = all), plus, with keep_best, the one
    # whose evaluation at the same step scored best on that metric (e.g. "arc/pass@2"): an
    # arc1_compact checkpoint is ~2 GB, and the final one is not always the best (TRM issue #26).
    keep_checkpoints: int = attrs.field(default=3, validator=non_negative)
    keep_best: str | None = None
    keep_best_mode: Literal["max", "min"] = "max"
    eval_batch_size: int | None = attrs.field(default=None, validator=positive)  # default: global_batch_size
    eval_limit: int | None = attrs.field(default=None, validator=positive)  # evaluate only the first K test examples
    eval_trajectories: int = attrs.field(default=0, validator=non_negative)  # pictures of N test examples per evaluation (the same random ones each time)
    log_interval: int = attrs.field(default=10, validator=positive)
    # Training order: "groups" is the reference TRM/DIS one (per pass one random variant of each
    # puzzle, its examples together), "examples" shuffles single examples; "auto" = groups when the
    # task's training split declares them (ARC does), else examples. See dis_core/step/data.py.
    sampler: Literal["auto", "examples", "groups"] = "auto"
    # Slots each process runs per forward/backward; the rest of its share of the global batch is
    # gradient accumulation (DeepSpeed's gradient_accumulation_steps). None = all of its share.
    # Changes memory, not the training: the carry, refills and halting are those of the whole batch.
    # "auto": the largest divisor of the share that the preflight finds fits in memory.
    micro_batch_size: MicroBatch = attrs.field(default=None, validator=_micro_batch)
    # bf16 = autocast over fp32 weights, optimizer and float64 loss. auto: bf16 where the device has
    # native bf16 (CUDA; CPUs with AVX512-BF16 or AMX), fp32 elsewhere (docs/results/precision_cpu.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Recompute each network call's activations in the backward instead of keeping them: less
    # memory for deeper recursion or bigger micro-batches, the same losses, one more forward of the
    # calls with gradient per step (docs/results/throughput_cpu.md). The backbone must support it
    # (trm, hrm do: an `activation_checkpointing` attribute).
    activation_checkpointing: bool = False
    # torch.compile the backbone (trm/hrm: their reasoning blocks) with inductor. Off by default: it changes the arithmetic (fused
    # kernels), so fp32 runs are no longer bit-identical to the reference, and compiling takes
    # tens of seconds per shape. Pays most in bf16 on a CPU (docs/results/throughput_cpu.md).
    compile: bool = False
    threads: int | None = attrs.field(default=None, validator=positive)  # torch intra-op threads on CPU
    # Measure memory and time with a probe step before training, stop (exit 2) if the run cannot
    # fit, choose an "auto" micro-batch (dis_core/loop/preflight.py). A few seconds at most.
    preflight: bool = True
    grad_clip: float = attrs.field(default=0.0, validator=non_negative)  # 0 = off (the reference does not clip)
    # A non-finite loss or gradient norm: "stop" the run (exit status 3, the newest checkpoint is
    # the last good one) or "skip" the update and its batch (see dis_core/loop/guards.py).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Sparse puzzle-embedding table (used when the backbone has puzzle_emb_ndim > 0): sign-SGD with
    # decoupled weight decay at its own learning rate, on the same warm-up schedule.
    puzzle_emb_lr: float = attrs.field(default=1e-2, validator=non_negative)
    puzzle_emb_weight_decay: float = attrs.field(default=0.1, validator=non_negative)
    ema: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0, high_open=True))  # EMA decay of the weights used for evaluation and checkpoints; 0 = off (TRM: 0.999)
    schedule: Schedule = attrs.field(factory=Schedule)
    # [train.optimizer] is a component slot: see recipe_class.

    def __attrs_post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs")
        if self.micro_batch_size == "auto" and not self.preflight:
            raise ValueError('train.micro_batch_size = "auto" needs train.preflight = true: the preflight measures what fits')


@attrs.frozen(kw_only=True)
class Supervision:
    n_sup: int = attrs.field(default=6, validator=positive)  # supervision steps per example (DIS 6, TRM max 16)
    # Per-step loss weights: uniform as the official DIS code; linear (w_s ∝ s, mean 1) as the paper.
    step_weights: Literal["uniform", "linear"] = "uniform"
    # Token input after the first step: the model's previous argmax (official DIS) or x again
    # (official TRM and HRM). Unset, it follows the targets: "question" for `final` targets,
    # "prediction" for per-step ones, so a TRM baseline never feeds itself its own answers
    # (resolve fills it in; the resolved recipe always holds the value used).
    step_input: Literal["prediction", "question"] | None = None
    loss: Literal["stablemax", "softmax"] = "stablemax"


@attrs.frozen(kw_only=True)
class Eval:
    """What an evaluation measures besides the evaluators' metrics (dis_core/loop/evaluation.py)."""

    # Guidance scales w (paper Eq. 5) to score in the same evaluation pass, each as a metric set
    # `<evaluator>/<metric>@w=<w>`; every w != 1 costs one more rollout. () = none.
    guidance: tuple[float, ...] = attrs.field(default=(), validator=finite)  # NaN would make summary.json invalid JSON
    # l_u, the readout "before the reasoning": y as the step received it ("step") or just before
    # the step's last y-update ("cycle"); the same when T = 1 (docs/concepts.md).
    readout: Literal["step", "cycle"] = "step"
    # diagnostics/advantage_margin@s and margin_positive@s (paper Prop. 4.1) at every evaluation.
    margin: bool = True
    # The split the evaluations during training read: "valid" (held out of training, not the test
    # split) lets a study select points and checkpoints without reading the test split (dis study).
    split: Literal["test", "valid"] = "test"


@attrs.frozen(kw_only=True)
class Recipe:
    """The recipe's own keys; the component slots (`task`, `backbone`, ..., `train.optimizer`)
    are added from the slot table by `recipe_class`."""

    description: str = ""
    supervision: Supervision = attrs.field(factory=Supervision)
    train: Train
    eval: Eval = attrs.field(factory=Eval)
    deepspeed: dict[str, Any] = attrs.field(factory=dict)  # passed through to DeepSpeed


@functools.cache
def recipe_class(slots: tuple[Slot, ...] = SLOTS) -> type:
    """`Recipe` with a field per slot: `ComponentSpec`, or a tuple of them for a `many` slot,
    defaulting to the slot's default component (required where it has none). A dotted key
    goes into the table it names: `train.optimizer` is a field of `Train`."""
    tree: dict = {}
    for slot in slots:
        *tables, field = slot.key.split(".")
        node = tree
        for table in tables:
            node = node.setdefault(table, {})
        node[field] = slot
    return _with_slots(Recipe, tree)


def _with_slots(cls: type, tree: dict) -> type:
    hints = typing.get_type_hints(cls)
    fields = {}
    for name, item in tree.items():
        if isinstance(item, Slot):
            if item.many:
                default = tuple(ComponentSpec(name=n) for n in ([item.default] if item.default else []))
                fields[name] = attrs.field(type=tuple[ComponentSpec, ...], default=default)
            elif item.default is None:
                fields[name] = attrs.field(type=ComponentSpec)
            else:
                fields[name] = attrs.field(type=ComponentSpec, factory=functools.partial(ComponentSpec, name=item.default))
            continue
        table = _with_slots(hints[name], item)  # e.g. Train with `optimizer`
        old = attrs.fields_dict(cls).get(name)
        has_default = old is not None and old.default is not attrs.NOTHING
        fields[name] = attrs.field(type=table, factory=table) if has_default else attrs.field(type=table)
    return attrs.make_class(cls.__name__, fields, bases=(cls,), frozen=True, kw_only=True, slots=True)


@attrs.frozen
class ResolvedRecipe:
    """A recipe whose component configs are structured into their own classes."""

    recipe: Recipe  # an instance of recipe_class(slots): `.task`, `.evaluators`, `.train.optimizer` ...
    configs: dict[str, Any]  # component path ("task", "evaluators[0]", "train.optimizer") -> config
    source: str
    slots: tuple[Slot, ...] = SLOTS

    def components(self) -> list[tuple[Slot, str, ComponentSpec]]:
        """(slot, component path, spec) of every component, in table (= build) order."""
        return [(slot, path, spec) for slot in self.slots for path, spec in slot.paths(value_at(self.recipe, slot.key))]

    def component(self, path: str) -> tuple[str, Any]:
        """(name, config) of the component at `path` ("backbone", "evaluators[1]", "train.optimizer")."""
        return value_at(self.recipe, path).name, self.configs[path]

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (every default filled in) as a plain TOML-able dict."""
        data = unstructure(self.recipe)
        for path, cfg in self.configs.items():
            value_at(data, path)["config"] = unstructure(cfg)
        # A recipe's usual layout: the description, the components in table order, the rest.
        order = ["description", *(s.key for s in self.slots if "." not in s.key), *attrs.fields_dict(Recipe)]
        data = {**{k: data[k] for k in order if k in data}, **data}
        return _drop_none(data)


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Pass 1: files, extends, overrides


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"file not found: {path}"], source=str(path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"not valid TOML: {exc}"], source=str(path)) from None
    except UnicodeDecodeError:
        raise RecipeError(["not UTF-8 text"], source=str(path)) from None


# Keys that replace each other: setting one (in a child recipe or with --set) clears the other,
# since a recipe may hold only one of them and TOML has no null to clear the inherited one.
EXCLUSIVE = {("train", "steps"): ("train", "epochs"), ("train", "epochs"): ("train", "steps")}


def _clear_exclusive(data: dict, path: tuple[str, ...]) -> None:
    other = EXCLUSIVE.get(path)
    if other and isinstance(data.get(other[0]), dict):
        data[other[0]].pop(other[1], None)


def merge(base: dict, child: dict) -> dict:
    """Deep-merge `child` over `base`. A component whose `name` changes gets the child's
    `config` alone: keys of another component's config would not fit."""
    out = copy.deepcopy(base)
    for (table, key), _ in EXCLUSIVE.items():
        if isinstance(child.get(table), dict) and key in child[table]:
            _clear_exclusive(out, (table, key))
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            old = out[key]
            if "name" in value and "name" in old and value["name"] != old["name"]:
                out[key] = copy.deepcopy(value)
            else:
                out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a recipe and its `extends` chain (relative to the file that names it)."""
    return _load_chain(Path(path), ())[0]


Origins = dict[tuple, Path]  # key path of a value -> directory its relative paths start from
MAX_EXTENDS = 32  # recipes in one `extends` chain, the recipe itself included


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], Origins]:
    """(merged data, the directory of the file that wrote each value)."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise RecipeError([f"extends forms a cycle: {chain}"], source=str(seen[0]))
    if len(seen) >= MAX_EXTENDS:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise RecipeError([f"the extends chain is longer than {MAX_EXTENDS} recipes: {chain} -> ..."], source=str(seen[0]))
    data = read_toml(path)
    parent = data.pop("extends", None)
    origins = _leaves(data, path.parent.absolute())
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise RecipeError(["invalid value (extends must be a file name string) @ $.extends"], source=str(path))
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if parent_path.is_dir():
        raise RecipeError([f"extends names a directory {parent!r} ({parent_path}), not a recipe file @ $.extends"], source=str(path))
    if not parent_path.is_file():
        raise RecipeError([f"extends names a missing file {parent!r} (looked at {parent_path}) @ $.extends"], source=str(path))
    base, base_origins = _load_chain(parent_path, (*seen, resolved))
    merged = merge(base, data)
    # A value the child does not set keeps its parent's directory; drop what the merge replaced.
    origins = {k: v for k, v in {**base_origins, **origins}.items() if k in _leaves(merged, Path())}
    return merged, origins


def _leaves(value: Any, folder: Path, at: tuple = ()) -> Origins:
    """Every leaf value's key path (list items by index), mapped to `folder`."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, folder, (*at, key)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, folder, (*at, i)).items()}
    return {at: folder}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value), the value read as a TOML value (bare words are strings)."""
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=100"], source="--set")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError([f"--set {text!r}: empty key"], source="--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `adamw` is a string
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` with the `--set` overrides applied; a `RecipeError` listing every bad one."""
    data, problems, _ = _apply_overrides(data, overrides)
    if problems:
        raise RecipeError(problems, source="--set")
    return data


def _apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, list[str], list[str]]:
    """(data with the good overrides applied, a problem per bad one, the good ones): a bad
    override is reported with the recipe's other problems, not alone."""
    data = copy.deepcopy(data)
    problems, applied = [], []
    for text in overrides:
        try:
            _apply_override(data, text)
        except RecipeError as exc:
            problems += exc.problems
        else:
            applied.append(text)
    return data, problems, applied


def _apply_override(data: dict, text: str) -> None:
    parts, value = parse_override(text)
    # Walk first, change nothing until the whole path is known to be good.
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError([f"--set {text!r}: no item {part} in {'.'.join(parts[:i])}"], source="--set")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError([f"--set {text!r}: {'.'.join(parts[:i])} is not a table"], source="--set")
        node = node.get(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError([f"--set {text!r}: no item {last}"], source="--set")
    elif not isinstance(node, dict):
        raise RecipeError([f"--set {text!r}: {'.'.join(parts[:-1])} is not a table"], source="--set")
    _clear_exclusive(data, tuple(parts))
    node = data
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        # Changing a component's name drops the old component's config (it would not fit).
        if last == "name" and node.get("name") not in (None, value):
            node.pop("config", None)
        node[last] = value


# ---------------------------------------------------------------------------------------------
# Passes 2 and 3


def resolve(data: dict[str, Any], registry, source: str = "<recipe>", *,
            base_dir: Path | None = None, origins: Origins | None = None, problems: list[str] = ()) -> ResolvedRecipe:
    """Passes 2 and 3; `problems` are pass 1's (bad `--set` overrides), reported with theirs.
    Relative paths in component configs become absolute: against the directory `origins` gives
    for the value, else `base_dir` (default: the current directory)."""
    slots = getattr(registry, "slots", SLOTS)
    # Pass 2. A bad value of the recipe's own fields (`train.ema = 2.0`) still gives the recipe
    # (built without validators); a wrong type or an unknown key gives None. Either way pass 3
    # goes on, from the raw tables.
    recipe, found = structure(data, recipe_class(slots), "$", unchecked=True)
    problems = [*problems, *found]
    batch_ok = recipe is not None and not any(
        p.endswith(("@ $.train.global_batch_size", "@ $.train.micro_batch_size")) for p in problems)

    base_dir = Path.cwd() if base_dir is None else base_dir
    configs: dict[str, Any] = {}
    for slot in slots:
        seen: set[str] = set()
        for path, name, table in _component_tables(data, slot):
            if name in seen:  # `many` slots are keyed by name (evaluators' metric prefixes)
                problems.append(f"{slot.kind} {name!r} is listed twice @ $.{path}")
            seen.add(name)
            try:
                entry = registry.get(slot.kind, name)
            except UnknownComponentError as exc:
                problems.append(f"{exc} @ $.{path}.name")
                continue
            cfg, errs = structure(table, entry.config_cls, f"$.{path}.config")
            problems += errs
            if cfg is not None:
                configs[path] = _absolute_paths(cfg, (*parts(path), "config"), base_dir, origins or {})
    if batch_ok:  # the batch split needs a sound batch
        problems += _run_problems(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    return ResolvedRecipe(_default_step_input(recipe), configs, source, slots)


def _component_tables(data: dict[str, Any], slot: Slot) -> list[tuple[str, str, dict]]:
    """(component path, name, raw config table) of each component of `slot` as the raw recipe
    writes it, the slot's default when it leaves the slot out. An item of the wrong shape (no
    name, a config that is not a table) is skipped: pass 2 has reported it."""
    node: Any = data
    *tables, key = slot.key.split(".")
    for table in tables:
        node = node.get(table, {}) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return []
    if key in node:
        value = node[key]
    elif slot.default is None:
        return []  # a required slot left out: pass 2 says so
    else:
        value = [{"name": slot.default}] if slot.many else {"name": slot.default}
    if slot.many != isinstance(value, list):
        return []
    return [(path, item["name"], item.get("config", {})) for path, item in slot.paths(value)
            if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("config", {}), dict)]


def _default_step_input(recipe):
    """`supervision.step_input` by the method when the recipe leaves it unset."""
    sup = recipe.supervision
    if sup.step_input is not None:
        return recipe
    chosen = "question" if value_at(recipe, "targets").name == "final" else "prediction"
    return attrs.evolve(recipe, supervision=attrs.evolve(sup, step_input=chosen))


def _run_problems(recipe) -> list[str]:
    """What a run would refuse at its start, beyond each table's own fields: the batch split over
    the launcher's processes and the `[deepspeed]` table (the rules live in `dis_core.wiring.deepspeed_table`)."""
    from dis_core.wiring.deepspeed_table import deepspeed_problems  # imports torch, loaded by the plugins already

    train = recipe.train
    micro = None if train.micro_batch_size == "auto" else train.micro_batch_size  # "auto" divides the share by construction
    return deepspeed_problems(recipe.deepspeed, global_batch=train.global_batch_size,
                              micro_batch=micro, grad_clip=train.grad_clip)


def _absolute_paths(obj: Any, at: tuple, base: Path, origins: Origins) -> Any:
    """`obj` with every relative `Path` in it (attrs fields, tuples) made absolute."""
    if isinstance(obj, Path):
        path = obj.expanduser()
        return path if path.is_absolute() else origins.get(at, base) / path
    if attrs.has(type(obj)):
        changes = {}
        for field in attrs.fields(type(obj)):
            value = getattr(obj, field.name)
            new = _absolute_paths(value, (*at, field.name), base, origins)
            if new is not value:
                changes[field.alias] = new
        return attrs.evolve(obj, **changes) if changes else obj
    if isinstance(obj, tuple) and any(isinstance(v, Path) or attrs.has(type(v)) for v in obj):
        return tuple(_absolute_paths(v, (*at, i), base, origins) for i, v in enumerate(obj))
    return obj


def load_recipe(path: str | Path, registry, overrides: list[str] | None = None) -> ResolvedRecipe:
    data, origins = _load_chain(Path(path), ())
    problems: list[str] = []
    if overrides:
        data, problems, applied = _apply_overrides(data, overrides)
        cwd = Path.cwd()
        for text in applied:  # a path given on the command line is relative to where it is typed
            keys, value = parse_override(text)
            at = _key_path(data, keys)
            origins = {k: v for k, v in origins.items() if k[: len(at)] != at}
            origins.update(_leaves(value, cwd, at))
    return resolve(data, registry, source=str(path), base_dir=Path(path).parent.absolute(), origins=origins,
                   problems=problems)


def _key_path(data: Any, keys: list[str]) -> tuple:
    """`--set` key parts as a key path: list items by index."""
    out, node = [], data
    for key in keys:
        part = int(key) if isinstance(node, list) else key
        out.append(part)
        node = node[part] if isinstance(node, (list, dict)) and (isinstance(node, list) or part in node) else None
    return tuple(out)
