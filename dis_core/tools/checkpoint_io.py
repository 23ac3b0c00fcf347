"""Published checkpoints in and out: `dis import` and `dis export` (docs/checkpoints.md).

An official checkpoint (TRM, HRM, DIS) is what the official `pretrain.py` writes: one file
`step_N`, the state dict of the loss head wrapping the model (keys `model.inner.*`, each with a
leading `_orig_mod.` when the model ran under `torch.compile`), with `all_config.yaml` beside it,
and the dataset the model was trained on (its builder writes `identifiers.json`, one name per
puzzle-embedding row, and `<split>/dataset.json`).

- `import_official` turns those into a dis run directory: a recipe rebuilt from the config (every
  value that matters mapped, the others named in run.json), the weights as a dis checkpoint, and
  provenance in run.json (source file, its sha256, the mapping). Everything dis does with a run
  (`dis eval`, `dis predict`, `dis_core.load`, trajectories, `--init-from`) then works on it.
- `export_official` writes the reverse: `step_N` (compiled-style keys) and `all_config.yaml`.
- `export_portable` writes dis's own portable folder: `model.safetensors`, the resolved
  `recipe.toml`, `run.json` and a model card `README.md`, the layout model hubs expect;
  `dis_core.load(folder)` and `dis eval folder` read it back (dis_core/tools/inference.py).

The parameter names: the official model's and dis's backbones hold the same tensors under other
names (NAME_PAIRS); TRM's single reasoning module `L_level` is dis's `net`. The golden traces
(tests/test_golden.py) load official weights into dis through these same functions.

Cheap to import (the `dis` parser imports it): torch, yaml and safetensors load when a command runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from dis_core.contract.errors import CheckpointError, DataError, UserError

# ------------------------------------------------------------------ names

# (official substring, dis substring), applied in order; the official key has lost `inner.`.
NAME_PAIRS = (
    ("embed_tokens.embedding_weight", "embed.tokens.weight"),
    ("timestep_embed.embedding_weight", "embed.step.weight"),
    ("embed_pos.embedding_weight", "embed.pos.weight"),
    ("L_level.layers.", "L.blocks."),
    ("H_level.layers.", "H.blocks."),
    (".self_attn.qkv_proj.", ".attn.qkv."),
    (".self_attn.o_proj.", ".attn.out."),
    (".mlp.gate_up_proj.", ".mlp.gate_up."),
    (".mlp.down_proj.", ".mlp.down."),
)
PUZZLE_TABLE = "puzzle_emb.weights"  # the official key (after `inner.`) of the puzzle table
COMPILED, HEAD = "_orig_mod.", "model."
PORTABLE_WEIGHTS = "model.safetensors"
# TRM's and HRM's pretrain.py write `step_N`; the DIS repository's training script `step_N.pth`.
STEP_FILE = re.compile(r"step_(\d+)(?:\.pth)?")


def dis_name(official: str, *, trm: bool = True) -> str | None:
    """The dis backbone parameter name of an official model key (`inner.*` or without the
    prefix); None for the puzzle table, which dis keeps outside the backbone."""
    name = official.removeprefix("inner.")
    if name == PUZZLE_TABLE:
        return None
    for old, new in NAME_PAIRS:
        name = name.replace(old, new)
    return name.replace("L.blocks.", "net.blocks.") if trm else name


def official_name(dis: str, *, trm: bool = True) -> str:
    """The reverse of `dis_name`: an official key (with `inner.`) of a dis backbone name."""
    name = dis.replace("net.blocks.", "L.blocks.") if trm else dis
    for old, new in reversed(NAME_PAIRS):
        name = name.replace(new, old)
    return f"inner.{name}"


def to_dis(state: dict, *, trm: bool) -> dict:
    """Official model weights (`inner.*`) keyed by dis backbone names, the puzzle table left out."""
    return {n: v for k, v in state.items() if (n := dis_name(k, trm=trm)) is not None}


def model_state(saved: dict, where: Path | str = "checkpoint") -> dict:
    """The model's tensors (`inner.*`) out of an official state dict: a compiled loss head's
    (`_orig_mod.model.inner.*`), an uncompiled one's (`model.inner.*`) or the bare model's."""
    if not isinstance(saved, dict) or not saved:
        raise CheckpointError(f"{where}: not a state dict (an official checkpoint is the file step_N that pretrain.py writes)")
    out = {}
    for key, value in saved.items():
        name = key.removeprefix(COMPILED).removeprefix(HEAD)
        if not name.startswith("inner."):
            raise CheckpointError(f"{where}: key {key!r} is not a model tensor (want [_orig_mod.][model.]inner.*)")
        out[name] = value
    return out


# ------------------------------------------------------------------ architectures

# The official model class (after `@` in arch.name) -> dis backbone; DIS's ACTV5 is TRM with a
# step embedding, fed its own previous answer, with a fixed number of steps.
ARCHITECTURES = {
    "TinyRecursiveReasoningModel_ACTV1": "trm",
    "TinyRecursiveReasoningModel_ACTV5": "dis",
    "HierarchicalReasoningModel_ACTV1": "hrm",
}
# Official arch keys that are derived from the data or fixed by the model, so carry nothing.
ARCH_DERIVED = {"name", "loss", "batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "causal"}


def _arch_class(cfg: dict, where: Path) -> tuple[str, str]:
    arch = cfg.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise CheckpointError(f"{where}: no arch.name (an official all_config.yaml names its model class there)")
    cls = arch["name"].split("@")[-1]
    if cls not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"{where}: arch.name {arch['name']!r}: unknown architecture {cls!r} (dis imports {known})")
    return cls, ARCHITECTURES[cls]


class Mapping:
    """What the config's values became: `mapped` {official key: dis key}, `unmapped` {official
    key: why nothing carries it}; both go into run.json."""

    def __init__(self, cfg: dict):
        self.cfg, self.mapped, self.unmapped = cfg, {}, {}

    def take(self, key: str, dis_key: str, default: Any = None, convert=lambda v: v) -> Any:
        node: Any = self.cfg
        for part in key.split("."):
            node = node.get(part, default) if isinstance(node, dict) else default
        self.mapped[key] = dis_key
        return convert(node)

    def leftover(self, table: dict, prefix: str, reason: str = "not used by dis") -> None:
        for k in table:
            full = f"{prefix}{k}"
            if full not in self.mapped and full not in self.unmapped:
                self.unmapped[full] = reason


def recipe_from_config(cfg: dict, *, where: Path, task: dict, step: int) -> tuple[dict, Mapping]:
    """A dis recipe (as a dict) from an official all_config.yaml; `task` is the [task] table."""
    cls, kind = _arch_class(cfg, where)
    m = Mapping(cfg)
    a = cfg["arch"]
    hidden = m.take("arch.hidden_size", "backbone.config.hidden_size", 512)
    backbone = {
        "hidden_size": hidden,
        "num_heads": m.take("arch.num_heads", "backbone.config.num_heads", 8),
        "expansion": float(m.take("arch.expansion", "backbone.config.expansion", 4.0)),
        "T": m.take("arch.H_cycles", "backbone.config.T", 1),
        "n": m.take("arch.L_cycles", "backbone.config.n", 2),
        "pos_encodings": m.take("arch.pos_encodings", "backbone.config.pos_encodings", "rope"),
        "rope_theta": float(m.take("arch.rope_theta", "backbone.config.rope_theta", 10000.0)),
        "puzzle_emb_ndim": m.take("arch.puzzle_emb_ndim", "backbone.config.puzzle_emb_ndim", 0),
        "step_embedding": kind == "dis",
    }
    if kind == "hrm":
        backbone["H_layers"] = m.take("arch.H_layers", "backbone.config.H_layers", 4)
        backbone["L_layers"] = m.take("arch.L_layers", "backbone.config.L_layers", 4)
    else:
        backbone["num_layers"] = m.take("arch.L_layers", "backbone.config.num_layers", 2)
        backbone["puzzle_emb_len"] = m.take("arch.puzzle_emb_len", "backbone.config.puzzle_emb_len", 0)
        backbone["mlp_t"] = bool(m.take("arch.mlp_t", "backbone.config.mlp_t", False))
        if "H_layers" in a:
            m.unmapped["arch.H_layers"] = "TRM has one reasoning module (L_level): H_layers is unused by the official model too"
    n_sup = m.take("arch.halt_max_steps", "supervision.n_sup", 16)
    if kind == "dis":
        n_sup = m.take("arch.N_supervision", "supervision.n_sup", n_sup)
        halting = {"name": "fixed"}
        step_input = "prediction"  # ACTV5 feeds each step its previous argmax answer
        targets = {"name": "reveal_path"}
    else:
        explore = float(m.take("arch.halt_exploration_prob", "halting.config.exploration_prob", 0.1))
        halting = {"name": "act", "config": {"exploration_prob": explore}}
        if kind == "hrm":  # HRM halts on q_halt > q_continue and trains q_continue (bootstrapped)
            halting["config"].update(halt_on_q_continue=True, continue_loss=True)
        else:
            no_continue = bool(m.take("arch.no_ACT_continue", "halting.config.halt_on_q_continue", True))
            halting["config"].update(halt_on_q_continue=not no_continue, continue_loss=not no_continue)
        step_input = "question"
        targets = {"name": "final"}
    loss_type = m.take("arch.loss.loss_type", "supervision.loss", "stablemax_cross_entropy")
    losses = {"stablemax_cross_entropy": "stablemax", "softmax_cross_entropy": "softmax"}
    if loss_type not in losses:
        raise CheckpointError(f"{where}: arch.loss.loss_type {loss_type!r} has no dis equivalent ({', '.join(losses)})")
    m.mapped["arch.loss.name"] = "(the loss head: dis's supervision step)"
    dtype = m.take("arch.forward_dtype", "train.precision", "bfloat16")
    ema = bool(m.take("ema", "train.ema", False))
    rate = float(m.take("ema_rate", "train.ema", 0.999))
    lr = float(m.take("lr", "train.optimizer.config.lr", 1e-4))
    min_ratio = float(m.take("lr_min_ratio", "train.schedule.min_lr_ratio", 1.0))
    recipe = {
        "description": f"imported from {where} ({cls})",
        "task": task,
        "backbone": {"name": "hrm" if kind == "hrm" else "trm", "config": backbone},
        "targets": targets,
        "halting": halting,
        "evaluators": [],
        "supervision": {"n_sup": n_sup, "step_input": step_input, "loss": losses[loss_type]},
        "train": {
            "seed": m.take("seed", "train.seed", 0),
            "global_batch_size": m.take("global_batch_size", "train.global_batch_size", 768),
            "steps": step,
            "precision": "bf16" if dtype == "bfloat16" else "fp32",
            "ema": rate if ema else 0.0,
            "puzzle_emb_lr": float(m.take("puzzle_emb_lr", "train.puzzle_emb_lr", 1e-2)),
            "puzzle_emb_weight_decay": float(m.take("puzzle_emb_weight_decay", "train.puzzle_emb_weight_decay", 0.1)),
            "optimizer": {"name": "adam_atan2", "config": {
                "lr": lr, "weight_decay": float(m.take("weight_decay", "train.optimizer.config.weight_decay", 0.1)),
                "betas": [float(m.take("beta1", "train.optimizer.config.betas[0]", 0.9)),
                          float(m.take("beta2", "train.optimizer.config.betas[1]", 0.95))]}},
            "schedule": {"warmup_steps": int(m.take("lr_warmup_steps", "train.schedule.warmup_steps", 0)),
                         "decay": "constant" if min_ratio == 1.0 else "cosine", "min_lr_ratio": min_ratio},
        },
    }
    m.mapped["data_paths"] = "task (from the data directory)"
    m.mapped["evaluators"] = "evaluators"
    for key, why in (("epochs", "the training length: train.steps is set to the checkpoint's step"),
                     ("eval_interval", "when the official run evaluated"), ("checkpoint_path", "where the official run wrote"),
                     ("project_name", "a tracker name"), ("run_name", "a tracker name"), ("load_checkpoint", "what it started from"),
                     ("freeze_weights", "fine-tuning option; dis fine-tunes with --init-from")):
        if key in cfg:
            m.unmapped[key] = why
    m.leftover({k: v for k, v in a.items() if k not in ARCH_DERIVED}, "arch.")
    m.leftover({k: v for k, v in cfg.items() if k != "arch"}, "")
    return recipe, m


# ------------------------------------------------------------------ the data of a checkpoint


def _task_from_data(cfg: dict, data: Path | None, run_dir: Path, m_unmapped: dict) -> tuple[dict, list[dict], dict]:
    """([task] table, [[evaluators]], data facts) for the dataset directory the official run
    trained on. ARC reads the official build itself (`reference_dir`), so the puzzle
    identifiers are the official ones row for row; Sudoku's test (and train) arrays are written
    as dis's Sudoku CSV layout (tokens are digit + 1 on both sides, 1 = blank), Maze's as the
    Maze-Hard CSV layout (the same tokens "# SGo" = 1..5 on both sides)."""
    if data is None:
        paths = cfg.get("data_paths_test") or cfg.get("data_paths") or []
        data = Path(paths[0]) if paths else None
    if data is None or not (data / "identifiers.json").is_file():
        raise UserError(f"{data}: no identifiers.json; pass --data DIR, the dataset directory the checkpoint was trained "
                        f"on (the official builder's output: identifiers.json, train/, test/)")
    try:
        meta = json.loads((data / "test" / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{data / 'test' / 'dataset.json'}: cannot be read ({exc})") from None
    ids = json.loads((data / "identifiers.json").read_text())
    facts = {"data": str(data.resolve()), "seq_len": meta["seq_len"], "vocab_size": meta["vocab_size"],
             "num_puzzle_identifiers": meta["num_puzzle_identifiers"], "identifiers": len(ids)}
    ks = [e.get("pass_Ks") for e in cfg.get("evaluators", []) if str(e.get("name", "")).startswith("arc")]
    if meta["seq_len"] == 900 and meta["vocab_size"] == 12:
        config = {"reference_dir": str(data.resolve())}
        arc = {"name": "arc"}
        if ks and ks[0]:
            arc["config"] = {"pass_ks": [int(k) for k in ks[0]]}
        return {"name": "arc", "config": config}, [arc, {"name": "exact"}], facts
    if meta["seq_len"] == 81 and meta["vocab_size"] == 11:
        def sudoku_row(q, a) -> tuple[str, str]:
            return "".join("." if t <= 1 else str(int(t) - 1) for t in q), "".join(str(int(t) - 1) for t in a)

        config = _csv_splits(data, run_dir, {"size": 9, "num_augmentations": 0}, m_unmapped, sudoku_row)
        return {"name": "sudoku", "config": config}, [{"name": "sudoku"}, {"name": "exact"}], facts
    side = int(round(meta["seq_len"] ** 0.5))
    if meta["vocab_size"] == 6 and side * side == meta["seq_len"] and side >= 3:
        return _maze_task(data, side, run_dir, m_unmapped), [{"name": "maze"}, {"name": "exact"}], facts
    raise DataError(f"{data}: a dataset of seq_len {meta['seq_len']}, vocab {meta['vocab_size']}: dis imports ARC "
                    f"(900, 12), Sudoku (81, 11) and Maze (a square N*N, 6) data; for another task write the recipe's "
                    f"[task] by hand")


def _csv_splits(data: Path, run_dir: Path, config: dict, m_unmapped: dict, row, check=None) -> dict:
    """The official build's test (and train) arrays -> dis's CSV layout (source, question, answer,
    rating) under RUN_DIR/data/, one line per example by `row(question, answer) -> (str, str)`,
    after `check(split_dir, questions, answers)`; `config` gains csv_test and csv_train (the test
    CSV when the build has no train arrays, which `m_unmapped` then names)."""
    import numpy as np

    out = run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("test", "train"):
        if not (data / split / "all__inputs.npy").is_file():
            continue
        q, a = (np.load(data / split / f"all__{k}.npy") for k in ("inputs", "labels"))
        if check is not None:
            check(data / split, q, a)
        with (out / f"{split}.csv").open("w") as f:
            f.write("source,question,answer,rating\n")
            for i, (qi, ai) in enumerate(zip(q, a)):
                question, answer = row(qi, ai)
                f.write(f"{split}{i},{question},{answer},0\n")
        config[f"csv_{split}"] = f"data/{split}.csv"
    if "csv_test" not in config:
        raise DataError(f"{data / 'test'}: no all__inputs.npy")
    if "csv_train" not in config:
        config["csv_train"] = config["csv_test"]
        m_unmapped["data.train"] = (f"{data / 'train'} holds no arrays: the train split is the test CSV "
                                    f"(fine-tune with --set task.config.csv_train=...)")
    return config


def _maze_task(data: Path, side: int, run_dir: Path, m_unmapped: dict) -> dict:
    """The official Maze build (`build_maze_dataset.py`: tokens 1..5 = "# SGo", as dis's, square
    grids, puzzle id 0) -> dis's Maze-Hard CSV layout under RUN_DIR/data/, read by task `maze`."""
    charset = "# SGo"  # the official builder's CHARSET, token = index + 1; dis's maze task uses the same

    def check(split_dir: Path, q, a) -> None:
        for arr, file, top, chars in ((q, "inputs", 4, "# SG"), (a, "labels", 5, "# SGo")):
            if arr.min() < 1 or arr.max() > top:
                raise DataError(f"{split_dir / f'all__{file}.npy'}: tokens outside 1..{top} ({chars!r}); not a "
                                f"maze built by the official Maze builder")
        ends = (q == 3) | (q == 4)
        if (ends & (a != q)).any():
            # dis's maze task keeps S and G in its labels; the official labels are the CSV's as given.
            m_unmapped["data.labels"] = (f"{split_dir}: labels mark S or G as 'o'; dis keeps S and G, so exact "
                                         f"accuracy counts those cells otherwise than the official loss head")

    def row(q, a) -> tuple[str, str]:
        return "".join(charset[t - 1] for t in q), "".join(charset[t - 1] for t in a)

    return {"name": "maze", "config": _csv_splits(data, run_dir, {"rows": side, "cols": side}, m_unmapped, row, check)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; an official checkpoint comes with the all_config.yaml its run wrote "
                        f"(pass it with --config)") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not an official all_config.yaml (a mapping with arch, data_paths, ...)")
    return cfg


def _load_torch(path: Path) -> dict:
    import torch

    if path.is_dir():
        steps = [p for p in path.glob("step_*") if STEP_FILE.fullmatch(p.name) and p.is_file()]
        steps.sort(key=lambda p: int(STEP_FILE.fullmatch(p.name).group(1)))
        if not steps:
            raise UserError(f"{path}: no step_N file (an official checkpoint directory holds step_N and all_config.yaml)")
        path = steps[-1]
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: cannot be read as a torch state dict ({type(exc).__name__})") from None


def import_official(source: Path, out: Path, *, config: Path | None = None, data: Path | None = None,
                    registry=None) -> Path:
    """An official checkpoint -> a dis run directory at `out` (see the module doc)."""
    import tomli_w
    import torch

    from dis_core.loop.checkpoint import RANK_FILE
    from dis_core.tools.inference import MODEL_FILE

    source = Path(source)
    ckpt_file, saved = _load_torch(source)
    cfg_file = Path(config) if config else ckpt_file.parent / "all_config.yaml"
    cfg = _read_yaml(cfg_file)
    _, kind = _arch_class(cfg, cfg_file)
    state = model_state(saved, ckpt_file)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; name a new directory for the imported run")
    out.mkdir(parents=True, exist_ok=True)
    step = int(m.group(1)) if (m := STEP_FILE.fullmatch(ckpt_file.name)) else 0
    unmapped: dict = {}
    task, evaluators, facts = _task_from_data(cfg, Path(data) if data else None, out, unmapped)
    recipe, mapping = recipe_from_config(cfg, where=cfg_file, task=task, step=max(step, 1))
    recipe["evaluators"] = evaluators
    mapping.unmapped.update(unmapped)
    (out / "recipe.toml").write_text(f"# dis import {ckpt_file} (config {cfg_file})\n" + tomli_w.dumps(_toml_ready(recipe)))

    # Build the model the recipe describes and load the official tensors into it: every backbone
    # tensor must be present and of the same shape, and nothing may be left over.
    solver, resolved = _build(out, registry)
    trm = kind != "hrm"
    weights = to_dis(state, trm=trm)
    own = solver.backbone.state_dict()
    problems = _differences(own, weights, official=lambda n: official_name(n, trm=trm), non_persistent=_non_persistent(solver.backbone))
    if problems:
        raise CheckpointError(f"{ckpt_file}: does not fit the {kind.upper()} model its all_config.yaml describes: {problems}")
    table = state.get(f"inner.{PUZZLE_TABLE}")
    puzzle = None
    if solver.puzzle_emb is not None:
        if table is None:
            raise CheckpointError(f"{ckpt_file}: missing key model.inner.{PUZZLE_TABLE} (puzzle_emb_ndim > 0 in {cfg_file})")
        want = tuple(solver.puzzle_emb.weights.shape)
        if tuple(table.shape) != want:
            raise CheckpointError(f"{ckpt_file}: model.inner.{PUZZLE_TABLE} has shape {tuple(table.shape)}, the data in "
                                  f"{facts['data']} has {want[0]} puzzle identifiers (x {want[1]}); pass the dataset the "
                                  f"checkpoint was trained on with --data")
        puzzle = {"weights": table.float().clone()}
    module = {f"backbone.{k}": (weights[k].to(v.dtype) if k in weights else v) for k, v in own.items()}
    ckpt_dir = out / "checkpoints" / f"step_{step}"
    ckpt_dir.mkdir(parents=True)
    torch.save({"module": module, "puzzle_emb": puzzle, "step": step}, ckpt_dir / MODEL_FILE)
    torch.save({"imported": True}, ckpt_dir / RANK_FILE.format(rank=0))  # marks the checkpoint complete
    (out / "checkpoints" / "latest").write_text(f"step_{step}\n")
    info = {
        "imported": {
            "source": str(ckpt_file.resolve()), "sha256": sha256(ckpt_file), "config": str(cfg_file.resolve()),
            "config_sha256": sha256(cfg_file), "architecture": cfg["arch"]["name"], "step": step,
            "compiled_keys": any(k.startswith(COMPILED) for k in saved), "data": facts,
            "mapping": mapping.mapped, "unmapped": mapping.unmapped,
            "tensors": {official_name(k, trm=trm): f"backbone.{k}" for k in weights} | (
                {f"inner.{PUZZLE_TABLE}": "puzzle_emb.weights"} if puzzle else {}),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "precision": resolved.recipe.train.precision if resolved.recipe.train.precision in ("fp32", "bf16") else None,
        "parameters": sum(p.numel() for p in solver.backbone.parameters()),
    }
    (out / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def _non_persistent(module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        for b in getattr(sub, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def _differences(own: dict, theirs: dict, *, official, non_persistent: set[str]) -> str:
    missing = [official(k) for k in own if k not in theirs and k not in non_persistent and "rotary" not in k]
    extra = [official(k) for k in theirs if k not in own]
    shapes = [f"{official(k)} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append("missing keys " + ", ".join(f"model.{k}" for k in missing[:8]))
    if extra:
        parts.append("unexpected keys " + ", ".join(f"model.{k}" for k in extra[:8]))
    if shapes:
        parts.append("shapes differ: " + "; ".join(shapes[:8]))
    return "; ".join(parts)


def _toml_ready(obj):
    if isinstance(obj, dict):
        return {k: _toml_ready(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_toml_ready(v) for v in obj]
    return obj


def _build(run_dir: Path, registry=None):
    from dis_core.step.solver import Solver
    from dis_core.wiring.plugins import load_registry
    from dis_core.wiring.recipe import load_recipe

    registry = registry or load_registry()
    resolved = load_recipe(run_dir / "recipe.toml", registry, ["loggers=[]", 'train.precision="fp32"'])
    import torch

    return Solver.build(resolved, registry, run_dir / "data", device=torch.device("cpu")), resolved


# ------------------------------------------------------------------ export


def _dis_to_official_config(model) -> dict:
    """An official all_config.yaml (as a dict) for a loaded dis model."""
    r = model.recipe
    b = r.backbone
    c = model.backbone.config  # the built backbone's typed config: defaults filled in
    dis_kind = b.name == "trm" and getattr(c, "step_embedding", False)
    if b.name not in ("trm", "hrm"):
        raise UserError(f"{model.run_dir}: backbone {b.name!r} has no official equivalent (trm, hrm)")
    if b.name == "hrm":
        name = "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1"
    elif dis_kind:
        name = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV5"
    else:
        name = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
    spec = model.spec
    arch: dict = {
        "name": name, "loss": {"name": "losses@ACTLossHead", "loss_type": f"{r.supervision.loss}_cross_entropy"},
        "hidden_size": c.hidden_size, "num_heads": c.num_heads, "expansion": c.expansion, "H_cycles": c.T, "L_cycles": c.n,
        "pos_encodings": c.pos_encodings, "rope_theta": c.rope_theta, "puzzle_emb_ndim": c.puzzle_emb_ndim,
        "halt_max_steps": r.supervision.n_sup, "forward_dtype": "bfloat16" if model.solver.precision == "bf16" else "float32",
    }
    if b.name == "hrm":
        arch.update(H_layers=c.H_layers, L_layers=c.L_layers)
    else:
        arch.update(H_layers=0, L_layers=c.num_layers, puzzle_emb_len=model.backbone.prefix_len, mlp_t=c.mlp_t)
    hc = _plain(r.halting.config) or {}
    arch["halt_exploration_prob"] = float(hc.get("exploration_prob", 0.1 if r.halting.name == "act" else 0.0))
    arch["no_ACT_continue"] = not bool(hc.get("halt_on_q_continue", False))
    if dis_kind:
        arch["N_supervision"] = r.supervision.n_sup
    t = r.train
    opt = _plain(t.optimizer.config) or {}
    betas = list(opt.get("betas", (0.9, 0.95)))
    data = (_plain(r.task.config) or {}).get("reference_dir")
    evaluators = [{"name": "arc@ARC", "pass_Ks": list((_plain(e.config) or {}).get("pass_ks", (1, 2, 5, 10, 100, 1000)))}
                  for e in r.evaluators if e.name == "arc"]
    return {
        "arch": arch, "data_paths": [str(data) if data else f"data/{r.task.name}"], "data_paths_test": [],
        "evaluators": evaluators, "global_batch_size": t.global_batch_size, "epochs": 1, "lr": float(opt.get("lr", 1e-4)),
        "lr_min_ratio": float(t.schedule.min_lr_ratio), "lr_warmup_steps": t.schedule.warmup_steps,
        "weight_decay": float(opt.get("weight_decay", 0.1)), "beta1": betas[0], "beta2": betas[1],
        "puzzle_emb_lr": t.puzzle_emb_lr, "puzzle_emb_weight_decay": t.puzzle_emb_weight_decay, "seed": t.seed,
        "ema": bool(t.ema), "ema_rate": float(t.ema or 0.999), "checkpoint_path": None, "load_checkpoint": None,
        "project_name": None, "run_name": None, "checkpoint_every_eval": False, "eval_interval": None,
        "min_eval_interval": 0, "eval_save_outputs": [], "freeze_weights": False,
        "_dis": {"spec": {"vocab_size": spec.vocab_size, "seq_len": spec.seq_len, "num_puzzle_identifiers": spec.num_puzzle_ids},
                 "note": "written by dis export; the official loader ignores keys it does not know"},
    }


def export_official(source: Path, out: Path, *, weights: str = "auto", data_dir: Path = Path("data"),
                    set_overrides=()) -> Path:
    """A dis run (or portable folder) -> `out/step_N` (keys `_orig_mod.model.inner.*`, as a
    compiled official loss head saves them) and `out/all_config.yaml`. `set_overrides` fix the
    recipe's paths of another machine (an ARC `reference_dir`), which loading the model needs."""
    import torch
    import yaml

    from dis_core.tools.inference import load

    model = load(source, set_overrides=set_overrides, data_dir=data_dir, weights=weights, device="cpu")
    cfg = _dis_to_official_config(model)
    trm = model.recipe.backbone.name == "trm"
    nonp = _non_persistent(model.backbone)
    state = {f"{COMPILED}{HEAD}{official_name(k, trm=trm)}": v.detach().clone()
             for k, v in model.backbone.state_dict().items() if k not in nonp and "rotary" not in k}
    if model.puzzle_emb is not None:
        state[f"{COMPILED}{HEAD}inner.{PUZZLE_TABLE}"] = model.puzzle_emb.weights.detach().clone()
    out.mkdir(parents=True, exist_ok=True)
    step = model.step or 0
    torch.save(state, out / f"step_{step}")
    (out / "all_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    return out / f"step_{step}"


def export_portable(source: Path, out: Path, *, weights: str = "auto", data_dir: Path = Path("data"),
                    set_overrides=()) -> Path:
    """A dis run -> a folder a model hub serves as is: model.safetensors, recipe.toml (resolved,
    `set_overrides` applied), run.json (the run's, plus what was exported) and README.md (the
    model card)."""
    import tomli_w
    from safetensors.torch import save_file

    from dis_core.tools.inference import load

    model = load(source, set_overrides=set_overrides, data_dir=data_dir, weights=weights, device="cpu")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; name a new folder for the exported model")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v.detach().contiguous().clone() for k, v in model.backbone.state_dict().items()}
    if model.puzzle_emb is not None:
        tensors["puzzle_emb.weights"] = model.puzzle_emb.weights.detach().contiguous().clone()
    save_file(tensors, str(out / PORTABLE_WEIGHTS), metadata={"format": "dis-portable-1", "step": str(model.step or 0),
                                                              "weights": model.weights})
    recipe = model.resolved.to_dict()
    (out / "recipe.toml").write_text(tomli_w.dumps(_toml_ready(recipe)))
    try:
        info = json.loads((model.run_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    try:
        summary = json.loads((model.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    info["exported"] = {"from": str(Path(source).resolve()), "step": model.step, "weights": model.weights,
                        "sha256": sha256(out / PORTABLE_WEIGHTS), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    (out / "README.md").write_text(_model_card(model, info, summary))
    return out


def _model_card(model, info: dict, summary: dict) -> str:
    r = model.recipe
    params = sum(p.numel() for p in model.backbone.parameters())
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and "/" in k and not k.startswith("cost/")}
    cost = {k: v for k, v in summary.items() if k.startswith("cost/")}
    lines = [
        "---", "library_name: dis", f"tags: [recursive-reasoning, {r.task.name}, {r.backbone.name}]", "---", "",
        f"# {r.task.name} / {r.backbone.name} ({params:,} parameters)", "",
        r.description or "A tiny recursive reasoning model trained with dis.", "",
        "## Task and data", "",
        f"- task `{r.task.name}`: `{json.dumps(_toml_ready(_plain(r.task.config)), default=str)}`",
        f"- backbone `{r.backbone.name}`: `{json.dumps(_toml_ready(_plain(r.backbone.config)), default=str)}`",
        f"- supervision steps: {r.supervision.n_sup}, halting `{r.halting.name}`, targets `{r.targets.name}`",
        f"- weights: {model.weights}, step {model.step}", "",
        "## Metrics", "",
        *([f"- `{k}`: {v:.4g}" for k, v in sorted(metrics.items())] or ["(no summary.json: evaluate with `dis eval` below)"]), "",
        "## Cost", "",
        *([f"- `{k}`: {v:.4g}" for k, v in sorted(cost.items())] or ["(not recorded)"]), "",
    ]
    if "imported" in info:
        imp = info["imported"]
        lines += ["## Provenance", "", f"Imported from `{Path(imp['source']).name}` (sha256 `{imp['sha256'][:16]}...`), "
                  f"architecture `{imp['architecture']}`.", ""]
    lines += [
        "## How to load", "",
        "```python", "import dis_core", "model = dis_core.load(\"THIS_FOLDER\")", "answers = model.predict([...])  # the task's input format",
        "```", "", "```bash", "dis eval THIS_FOLDER", "dis predict THIS_FOLDER puzzles.json", "```", "",
        "Files: `model.safetensors` (backbone and puzzle table), `recipe.toml` (the resolved recipe), `run.json`.", "",
    ]
    return "\n".join(lines)


def _plain(obj):
    import attrs

    return attrs.asdict(obj) if attrs.has(type(obj)) else obj


# ------------------------------------------------------------------ fine-tuning (--init-from)


def init_weights(solver, source: Path) -> dict:
    """Load the weights of `source` (a dis run directory, checkpoint or portable folder, or an
    official step_N file or the folder holding it) into a freshly built solver, for `dis run
    --init-from`. The backbone must match tensor for tensor; a puzzle table of another size is
    re-initialised with the mean of the saved rows, as the official loader does when a model is
    fine-tuned on a dataset with other puzzle identifiers. Returns what was done (for the log)."""
    import torch

    source = Path(source)
    trm = hasattr(solver.backbone, "net")  # TRM: one module `net` (official L_level); HRM: H and L
    official = source.is_file() or (source.is_dir() and any(source.glob("step_*")) and (source / "all_config.yaml").is_file()
                                    and not (source / "recipe.toml").is_file())
    if official:
        where, saved = _load_torch(source)
        state = model_state(saved, where)
        backbone, table = to_dis(state, trm=trm), state.get(f"inner.{PUZZLE_TABLE}")
    else:
        from dis_core.tools.inference import _backbone_state, locate_and_read

        _, where, saved = locate_and_read(source)
        backbone = _backbone_state(saved["ema"] if saved["ema"] is not None else saved["module"])
        table = (saved["puzzle_emb"] or {}).get("weights")
    own = solver.backbone.state_dict()
    problems = _differences(own, backbone, official=lambda n: n, non_persistent=_non_persistent(solver.backbone))
    if problems:
        raise CheckpointError(f"--init-from {where}: does not fit the model this recipe builds: {problems}")
    solver.backbone.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in backbone.items()}})
    done = {"init_from": str(where), "puzzle_table": "none"}
    if solver.puzzle_emb is not None:
        rows = solver.puzzle_emb.weights
        if table is None:
            done["puzzle_table"] = "kept fresh (the source has none)"
        elif tuple(table.shape) == tuple(rows.shape):
            rows.data.copy_(table)
            done["puzzle_table"] = "loaded"
        elif table.shape[-1] == rows.shape[-1]:
            rows.data.copy_(table.float().mean(0, keepdim=True).expand_as(rows))
            done["puzzle_table"] = f"{table.shape[0]} rows -> {rows.shape[0]}: every row set to their mean"
        else:
            raise CheckpointError(f"--init-from {where}: puzzle table width {table.shape[-1]}, the recipe's is {rows.shape[-1]}")
    return done


# ------------------------------------------------------------------ the command line


def add_parsers(sub) -> None:
    imp = sub.add_parser("import", help="an official TRM/HRM/DIS checkpoint -> a dis run directory (docs/checkpoints.md)")
    imp.add_argument("source", type=Path, metavar="PATH", help="the official step_N file, or the folder holding it")
    imp.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="the dis run directory to write (new)")
    imp.add_argument("--config", type=Path, default=None, help="its all_config.yaml (default: beside the checkpoint)")
    imp.add_argument("--data", type=Path, default=None, metavar="DIR",
                     help="the dataset directory it was trained on (identifiers.json, train/, test/); default: data_paths of the config")
    ex = sub.add_parser("export", help="a dis run -> an official checkpoint or a portable model folder (docs/checkpoints.md)")
    ex.add_argument("source", type=Path, metavar="RUN_DIR", help="a run directory, a checkpoint of one, or a portable folder")
    ex.add_argument("--format", choices=("official", "portable"), required=True)
    ex.add_argument("--out", type=Path, required=True, metavar="DIR")
    ex.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto")
    ex.add_argument("--data-dir", type=Path, default=Path("data"), help="cache for prepared task data")
    ex.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the run's recipe, e.g. the ARC task.config.reference_dir of this machine (repeatable)")


def cmd_import(args) -> int:
    out = import_official(args.source, args.out, config=args.config, data=args.data)
    info = json.loads((out / "run.json").read_text())["imported"]
    print(f"imported {info['architecture']} step {info['step']} -> {out}", file=sys.stderr)
    for key, why in sorted(info["unmapped"].items()):
        print(f"  not carried: {key} ({why})", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    if args.format == "official":
        path = export_official(args.source, args.out, weights=args.weights, data_dir=args.data_dir, set_overrides=args.overrides)
    else:
        path = export_portable(args.source, args.out, weights=args.weights, data_dir=args.data_dir, set_overrides=args.overrides)
    print(f"written {path}", file=sys.stderr)
    return 0


COMMANDS = {"import": cmd_import, "export": cmd_export}
