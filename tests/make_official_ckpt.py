"""Record the official-checkpoint fixtures of tests/test_checkpoint_io.py from the official code.

Each fixture is what a user downloads from a published run, at a tiny size: the official
dataset builder's output (`data/`: identifiers.json, train/ and test/ .npy files, dataset.json,
for ARC test_puzzles.json), a checkpoint written as the official `pretrain.py` writes one
(`step_N`: the state dict of the loss head wrapping the model, under `torch.compile`, so every
key starts `_orig_mod.model.inner.`) and its `all_config.yaml` (the official PretrainConfig,
dumped as the official code dumps it). Beside them `official_eval.pt`: what the official
evaluation gives on the checkpoint (per-example predictions and halting logits in the order of
the test split, the loss head's metrics and, for ARC, the ARC evaluator's pass@K and its
submission.json).

The official code runs from checkouts named by environment variables; nothing of it is copied:

    DIS_OFFICIAL_TRM=../TinyRecursiveModels DIS_OFFICIAL_DIS=../Deep-Improvement-Supervision \\
        python tests/make_official_ckpt.py [--out tests/fixtures/official_ckpt] [--only trm_maze ...]

Training runs a few steps of the official `train_batch` (so the weights are not at their
initial values), on CPU in fp32 with one thread; `trm_maze` (7x7 mazes through the official Maze
builder) 300 steps, and `trm_arc_solved` (ARC tasks written here, through the official ARC builder)
600 steps, so that the official evaluation solves one held-out task of three: pass@K > 0. Two more fixtures: `dis_export_arc`, the reverse
direction (a model trained by `dis run`, exported with `dis export --format official` and
evaluated by the official TRM code through its own `load_checkpoint`), and `dis_sudoku`, the DIS
repository's ACTV5 model trained, saved (`step_N.pth`) and evaluated by its own training script. The official modules' unused imports (numba's
JIT in the ARC evaluator, the Hugging Face download in the Sudoku builder, wandb, ...) are stubbed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml  # the real one, imported before the stubs of official.prepare (which answer `yaml` too)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "parity"))
from official import prepare, use_repo  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "official_ckpt"
ARC_TASKS = ("Copy/Copy1", "Center/Center1", "AboveBelow/AboveBelow3")  # from dis's bundled ConceptARC corpus
# Tiny models: D 16, 2 heads, one block, 3 supervision steps; fp32 so CPU results are exact.
ARCH = dict(hidden_size=16, num_heads=2, expansion=2, H_cycles=2, L_cycles=2, halt_max_steps=3,
            halt_exploration_prob=0.1, pos_encodings="rope", forward_dtype="float32", mlp_t=False,
            no_ACT_continue=True, puzzle_emb_ndim=16)
STEPS = 6  # official optimizer steps before the checkpoint is written


def _stub_unused_imports() -> None:
    prepare()
    numba = types.ModuleType("numba")
    numba.njit = lambda f=None, **kw: f if f is not None else (lambda g: g)  # the ARC evaluator's JIT: plain Python
    sys.modules["numba"] = numba
    argdantic = types.ModuleType("argdantic")  # the builders' command line: `cli.command(...)` decorates main

    class ArgParser:
        def command(self, *args, **kwargs):
            return lambda f: f

    argdantic.ArgParser = ArgParser
    sys.modules["argdantic"] = argdantic


def _sudoku_csv(path: Path, n: int, seed: int) -> None:
    """n valid 9x9 puzzles (a shuffled base solution, half the cells blanked)."""
    rng = np.random.default_rng(seed)
    base = np.array([[(r * 3 + r // 3 + c) % 9 for c in range(9)] for r in range(9)])
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "question", "answer", "rating"])
        for i in range(n):
            digits = rng.permutation(9) + 1
            band = np.concatenate([rng.permutation(3) + 3 * b for b in rng.permutation(3)])
            grid = digits[base[band]]
            question = grid.copy()
            question[rng.random((9, 9)) < 0.5] = 0
            q = "".join("." if d == 0 else str(d) for d in question.flat)
            w.writerow([f"fixture{i}", q, "".join(str(d) for d in grid.flat), 0])


def _build_sudoku(repo: Path, out: Path) -> None:
    csvs = out / "csv"
    csvs.mkdir(parents=True, exist_ok=True)
    _sudoku_csv(csvs / "train.csv", 8, 0)
    _sudoku_csv(csvs / "test.csv", 6, 1)
    np.random.seed(0)
    _run_csv_builder(repo, csvs, "build_sudoku_dataset", output_dir=str(out / "data"), num_aug=1)


def _run_csv_builder(repo: Path, csvs: Path, module: str, **config) -> None:
    """Run the official `dataset/<module>.py` on the CSVs in `csvs` (its Hugging Face download
    replaced by those local files), both splits, with `DataProcessConfig(**config)`."""
    import importlib

    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = lambda repo_id, filename, repo_type=None: str(csvs / filename)  # local CSVs, no download
    sys.modules["huggingface_hub"] = hub
    sys.path.insert(0, str(repo / "dataset"))  # the builder imports `common` as a top-level module
    try:
        use_repo(repo)
        sys.modules.pop(module, None)
        builder = importlib.import_module(f"dataset.{module}")
        for split in ("train", "test"):
            builder.convert_subset(split, builder.DataProcessConfig(**config))
    finally:
        sys.path.remove(str(repo / "dataset"))


MAZE_SIZE = 7  # 7x7 mazes: seq_len 49


def _build_maze(repo: Path, out: Path) -> None:
    """The official Maze builder on a handful of 7x7 mazes (dis's generator, written in the
    Maze-Hard CSV layout the builder downloads: S and G kept, the path 'o')."""
    from dis_plugins.tasks.maze_puzzles import CHARSET, generate_bank

    csvs = out / "csv"
    csvs.mkdir(parents=True, exist_ok=True)
    seen: set = set()
    for split, count, seed in (("train", 12, 0), ("test", 6, 1)):
        bank, _ = generate_bank(MAZE_SIZE, MAZE_SIZE, count, seed, 4, 0.1, True, seen)
        seen |= {bytes(q) for q in bank["question"]}
        with (csvs / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["source", "question", "answer", "rating"])
            for i, (q, a, n) in enumerate(zip(bank["question"], bank["label"], bank["length"])):
                w.writerow([f"fixture{i}", "".join(CHARSET[t - 1] for t in q), "".join(CHARSET[t - 1] for t in a), int(n)])
    _run_csv_builder(repo, csvs, "build_maze_dataset", output_dir=str(out / "data"))  # aug off: the README's command


def _build_arc(repo: Path, out: Path) -> None:
    corpus = ROOT / "plugins" / "tasks" / "arc" / "data" / "conceptarc" / "corpus"
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    tasks = {name.split("/")[1]: json.loads((corpus / f"{name}.json").read_text()) for name in ARC_TASKS}
    names = list(tasks)
    # Kaggle layout: one task trained on whole, two held out (their test pairs form the test split).
    (src / "fx_training_challenges.json").write_text(json.dumps({names[0]: tasks[names[0]]}))
    held = {n: {"train": tasks[n]["train"], "test": [{"input": p["input"]} for p in tasks[n]["test"]]} for n in names[1:]}
    (src / "fx_evaluation_challenges.json").write_text(json.dumps(held))
    (src / "fx_evaluation_solutions.json").write_text(json.dumps({n: [p["output"] for p in tasks[n]["test"]] for n in names[1:]}))
    use_repo(repo)
    from dataset import build_arc_dataset as builder

    config = builder.DataProcessConfig(input_file_prefix=str(src / "fx"), output_dir=str(out / "data"),
                                       subsets=["training", "evaluation"], test_set_name="evaluation", num_aug=3)
    builder.convert_dataset(config)
    shutil.rmtree(src)


# ARC tasks a tiny model learns on a CPU in a few hundred steps, written here (no corpus needed):
# name -> how an output grid follows from its input. Copies teach the model to answer with its
# input; the held-out tasks (their test pairs form the test split) are a copy, which it solves,
# and a mirror image and a recolouring, which it need not: pass@K then counts solved and unsolved
# tasks alike.
ARC_SOLVABLE_TRAIN = {"copy_a": lambda g: g, "copy_b": lambda g: g}
ARC_SOLVABLE_HELD = {"copy_c": lambda g: g, "mirror": lambda g: g[:, ::-1], "recolour": lambda g: np.where(g > 0, 5, 0)}


def _arc_task(rule, rng: np.random.Generator, pairs: int) -> dict:
    """pairs demonstrations and one test pair of random 3x3..4x4 grids (half the cells black)."""
    def grid():
        g = rng.integers(1, 10, size=tuple(rng.integers(3, 5, size=2)))
        return np.where(rng.random(g.shape) < 0.5, 0, g)

    examples = [(g, rule(g)) for g in (grid() for _ in range(pairs + 1))]
    as_pair = lambda p: {"input": p[0].tolist(), "output": np.asarray(p[1]).tolist()}  # noqa: E731
    return {"train": [as_pair(p) for p in examples[:pairs]], "test": [as_pair(examples[-1])]}


def _build_arc_solvable(repo: Path, out: Path) -> None:
    """The official ARC builder on ARC_SOLVABLE_*'s tasks (Kaggle layout, held-out tasks'
    solutions in their own file), 3 augmentations per task."""
    rng = np.random.default_rng(7)
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    train = {name: _arc_task(rule, rng, 4) for name, rule in ARC_SOLVABLE_TRAIN.items()}
    held = {name: _arc_task(rule, rng, 3) for name, rule in ARC_SOLVABLE_HELD.items()}
    (src / "fx_training_challenges.json").write_text(json.dumps(train))
    (src / "fx_evaluation_challenges.json").write_text(json.dumps(
        {n: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]} for n, t in held.items()}))
    (src / "fx_evaluation_solutions.json").write_text(json.dumps({n: [p["output"] for p in t["test"]] for n, t in held.items()}))
    use_repo(repo)
    from dataset import build_arc_dataset as builder

    config = builder.DataProcessConfig(input_file_prefix=str(src / "fx"), output_dir=str(out / "data"),
                                       subsets=["training", "evaluation"], test_set_name="evaluation", num_aug=3)
    builder.convert_dataset(config)
    (out / "tasks.json").write_text(json.dumps({"training": train, "evaluation": held}))  # what the build was made from
    shutil.rmtree(src)


def _official_config(kind: str, arch: dict, data: str, evaluators: list) -> dict:
    from pretrain import PretrainConfig

    name, loss = {
        "trm": ("recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1", "losses@ACTLossHead"),
        "hrm": ("recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1", "losses@ACTLossHead"),
    }[kind]
    return PretrainConfig(
        arch={"name": name, "loss": {"name": loss, "loss_type": "stablemax_cross_entropy"}, **arch},
        data_paths=[data], evaluators=evaluators, global_batch_size=4, epochs=1, lr=1e-3, lr_min_ratio=1.0,
        lr_warmup_steps=2, weight_decay=0.1, beta1=0.9, beta2=0.95, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1,
        checkpoint_path="checkpoints/fixture", seed=0,
    )


class _CpuTorch(types.ModuleType):
    """`torch` as the official evaluation loop sees it on CPU: its `torch.device("cuda")` and
    `torch.zeros(..., device="cuda")` mean the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return torch.device("cpu")

    @staticmethod
    def zeros(*args, **kwargs):
        kwargs.pop("device", None)
        return torch.zeros(*args, **kwargs)

    @staticmethod
    def load(*args, **kwargs):  # the official loader's map_location="cuda"
        kwargs["map_location"] = "cpu"
        return torch.load(*args, **kwargs)


class _Compiled(torch.nn.Module):
    """What `torch.compile` wraps the loss head in, without compiling: its state dict's keys start
    `_orig_mod.` and attributes reach the loss head, so the official `load_checkpoint` (strict
    `load_state_dict`) runs on CPU unchanged."""

    def __init__(self, head):
        super().__init__()
        self._orig_mod = head

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def _train_and_evaluate(kind: str, repo: Path, out: Path, arch: dict, evaluators: list, save_outputs: list, *,
                        steps: int = STEPS, lr: float = 1e-3, batch_size: int = 4, epochs_per_iter: int = 4) -> None:
    use_repo(repo)
    import pretrain
    from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
    from utils.functions import load_model_class

    config = pretrain.PretrainConfig(**dict(_official_config(kind, arch, str(out / "data"), evaluators).model_dump(),
                                            global_batch_size=batch_size, lr=lr))
    meta = {}

    def loader(split: str, test: bool):
        ds = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_paths=[str(out / "data")], global_batch_size=batch_size,
                                               test_set_mode=test, epochs_per_iter=epochs_per_iter, rank=0, num_replicas=1),
                           split=split)
        meta[split] = ds.metadata
        return ds

    train = loader("train", False)
    torch.manual_seed(0)
    model_cfg = dict(**config.arch.__pydantic_extra__, batch_size=batch_size, vocab_size=meta["train"].vocab_size,
                     seq_len=meta["train"].seq_len, num_puzzle_identifiers=meta["train"].num_puzzle_identifiers, causal=False)
    model = load_model_class(config.arch.loss.name)(load_model_class(config.arch.name)(model_cfg), **config.arch.loss.__pydantic_extra__)
    sign_sgd = CastedSparseEmbeddingSignSGD_Distributed(model.model.puzzle_emb.buffers(), lr=0, weight_decay=0.1, world_size=1)
    adamw = torch.optim.AdamW(model.parameters(), lr=0, weight_decay=0.1, betas=(0.9, 0.95))
    state = pretrain.TrainState(model=model, optimizers=[sign_sgd, adamw], optimizer_lrs=[1e-2, lr], carry=None,
                                step=0, total_steps=steps)
    model.train()
    real_torch = pretrain.torch
    pretrain.torch = _CpuTorch()
    try:
        metrics = _train_then_evaluate(pretrain, config, state, train, loader, meta, save_outputs, out)
    finally:
        pretrain.torch = real_torch
    outputs = torch.load(out / "official_eval" / f"step_{state.step}_all_preds.0")
    _record(metrics, outputs, state, out)


def _train_then_evaluate(pretrain, config, state, train, loader, meta, save_outputs, out: Path) -> dict:
    model = state.model
    for _, batch, gbs in train:
        if state.step >= state.total_steps:
            break
        pretrain.train_batch(config, state, batch, gbs, rank=0, world_size=1)
    # As pretrain.py saves it: the compiled loss head's state dict (keys `_orig_mod.model.inner.*`).
    saved = {f"_orig_mod.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(saved, out / f"step_{state.step}")

    (out / "all_config.yaml").write_text(yaml.dump(config.model_dump()))

    # The official evaluation, its own `evaluate` (the test split, every example to the last step).
    test = loader("test", True)
    config.eval_save_outputs = save_outputs
    config.checkpoint_path = str(out / "official_eval")
    (out / "official_eval").mkdir()
    evs = pretrain.create_evaluators(config, meta["test"])
    model.eval()
    return pretrain.evaluate(config, state, test, meta["test"], evs, rank=0, world_size=1, cpu_group=None)


def _record(metrics, outputs, state, out: Path) -> None:
    # Per-set loss-head metrics ({"all": {...}}) beside the evaluators' top-level ones ("ARC/pass@1").
    flat = {k: ({n: float(x) for n, x in v.items()} if isinstance(v, dict) else float(v)) for k, v in (metrics or {}).items()}
    # Predictions are tokens < 12: uint8 keeps the fixture small. Padding rows of the last batch
    # (puzzle identifier 0, the blank) are kept; the tests drop them as the evaluators do.
    outputs = {k: v.to(torch.uint8) if k == "preds" else v for k, v in outputs.items()}
    record = {"metrics": flat, "outputs": outputs, "step": state.step}
    sub = next((out / "official_eval").glob("evaluator_ARC*/submission.json"), None)
    if sub is not None:
        record["submission"] = json.loads(sub.read_text())
    shutil.rmtree(out / "official_eval")
    torch.save(record, out / "official_eval.pt")
    # dis evaluates the test split only; the train arrays (the bulk of the bytes) were needed
    # by the official training above, their dataset.json stays for the metadata.
    for npy in (out / "data" / "train").glob("*.npy"):
        npy.unlink()


# ------------------------------------------------------------------ dis -> official

def _dis(*args) -> None:
    """A dis command in its own process, as a user runs it (one thread: the machine is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "dis_core.tools.cli", *map(str, args)], check=True, env=env, cwd=ROOT)


# Enough training that the model answers with more than the background colour: a constant answer
# would be matched by any wiring, proving nothing.
DIS_RUN_STEPS, DIS_RUN_LR = 150, 3e-3


def _dis_arc_recipe(data: Path) -> dict:
    """A dis recipe for TRM on the official ARC build in `data` (read as `reference_dir`, so the
    puzzle table's rows are the official identifiers), the trm_arc fixture's shapes, fp32."""
    a = dict(ARCH, L_layers=1, puzzle_emb_len=2, puzzle_emb_ndim=24)
    return {
        "description": "dis-trained TRM for the dis -> official proof (tests/make_official_ckpt.py)",
        "task": {"name": "arc", "config": {"reference_dir": str(data)}},
        "backbone": {"name": "trm", "config": {
            "hidden_size": a["hidden_size"], "num_heads": a["num_heads"], "expansion": float(a["expansion"]),
            "T": a["H_cycles"], "n": a["L_cycles"], "num_layers": a["L_layers"], "puzzle_emb_len": a["puzzle_emb_len"],
            "puzzle_emb_ndim": a["puzzle_emb_ndim"], "pos_encodings": "rope", "mlp_t": False}},
        "targets": {"name": "final"},
        "halting": {"name": "act", "config": {"exploration_prob": 0.1, "halt_on_q_continue": False, "continue_loss": False}},
        "evaluators": [{"name": "arc", "config": {"pass_ks": [1, 2, 5]}}, {"name": "exact"}],
        "supervision": {"n_sup": a["halt_max_steps"], "step_input": "question", "loss": "stablemax"},
        "train": {"seed": 0, "global_batch_size": 4, "steps": DIS_RUN_STEPS, "precision": "fp32", "threads": 1, "preflight": False,
                  "puzzle_emb_lr": 1e-2, "optimizer": {"name": "adam_atan2", "config": {"lr": DIS_RUN_LR}},
                  "schedule": {"warmup_steps": 2, "decay": "constant"}},
        "loggers": [],
    }


def tensor_digests(state: dict) -> dict:
    """sha256 of each tensor's bytes (and dtype, shape): what `dis export --format official`
    wrote, recorded so the test can check that its own export is the file evaluated here."""
    import hashlib

    return {k: hashlib.sha256(f"{v.dtype}{tuple(v.shape)}".encode() + v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in sorted(state.items())}


def _official_evaluate_export(repo: Path, export: Path, data: Path, work: Path, save_outputs: list) -> tuple[dict, dict, int]:
    """The exported checkpoint through the official code alone: its PretrainConfig from the
    exported all_config.yaml, its model classes, its `load_checkpoint` (strict: every key, no
    extra) and its `evaluate` with the evaluators the config names."""
    use_repo(repo)
    import pretrain
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
    from utils.functions import load_model_class

    step_file = next(p for p in export.iterdir() if p.name.startswith("step_"))
    raw = yaml.safe_load((export / "all_config.yaml").read_text())
    assert raw["data_paths"] == [str(data)], raw["data_paths"]  # the export names the build dis trained on
    raw.update(load_checkpoint=str(step_file), checkpoint_path=str(work), eval_save_outputs=save_outputs)
    config = pretrain.PretrainConfig(**raw)
    meta = {}

    def loader(split: str, test: bool):
        ds = PuzzleDataset(PuzzleDatasetConfig(seed=config.seed, dataset_paths=config.data_paths, global_batch_size=config.global_batch_size,
                                               test_set_mode=test, epochs_per_iter=1, rank=0, num_replicas=1), split=split)
        meta[split] = ds.metadata
        return ds

    loader("train", False)
    test = loader("test", True)
    model_cfg = dict(**config.arch.__pydantic_extra__, batch_size=config.global_batch_size, vocab_size=meta["train"].vocab_size,
                     seq_len=meta["train"].seq_len, num_puzzle_identifiers=meta["train"].num_puzzle_identifiers, causal=False)
    torch.manual_seed(1)  # any init: load_checkpoint replaces every tensor
    head = load_model_class(config.arch.loss.name)(load_model_class(config.arch.name)(model_cfg), **config.arch.loss.__pydantic_extra__)
    step = int(step_file.name.split("_")[1])
    real_torch = pretrain.torch
    pretrain.torch = _CpuTorch()
    try:
        pretrain.load_checkpoint(_Compiled(head), config)
        state = pretrain.TrainState(model=head, optimizers=[], optimizer_lrs=[], carry=None, step=step, total_steps=step)
        head.eval()
        work.mkdir(parents=True, exist_ok=True)
        metrics = pretrain.evaluate(config, state, test, meta["test"], pretrain.create_evaluators(config, meta["test"]),
                                    rank=0, world_size=1, cpu_group=None)
    finally:
        pretrain.torch = real_torch
    return metrics, torch.load(work / f"step_{step}_all_preds.0"), step


def record_dis_export(trm: Path, out: Path = FIXTURES) -> Path:
    """dis -> official: a TRM trained a few steps by `dis run` on the trm_arc fixture's official
    ARC build, exported with `dis export --format official`, evaluated by the official code.
    Kept: the dis model as `dis export --format portable` writes it (`model/`), and
    official_eval.pt (the official evaluation, as for the other fixtures, plus the digests of the
    exported tensors). The data is trm_arc's (the same build: checked here), not stored twice."""
    import tempfile

    import tomli_w

    where = out / "dis_export_arc"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _build_arc(trm, tmp)
        shared = out / "trm_arc" / "data"
        for rel in ("identifiers.json", "test_puzzles.json", "test/all__inputs.npy", "test/all__labels.npy", "test/all__puzzle_identifiers.npy"):
            if (tmp / "data" / rel).read_bytes() != (shared / rel).read_bytes():
                raise SystemExit(f"{shared / rel}: differs from a fresh official build; record trm_arc first")
        (tmp / "recipe.toml").write_text(tomli_w.dumps(_dis_arc_recipe(tmp / "data")))
        _dis("run", tmp / "recipe.toml", "--out", tmp / "run")
        _dis("export", tmp / "run", "--format", "official", "--out", tmp / "official")
        # The model folder names the shared build (relative to the repository root: the tests
        # pass --set task.config.reference_dir anyway).
        _dis("export", tmp / "run", "--format", "portable", "--out", where / "model",
             "--set", f'task.config.reference_dir="{os.path.relpath(shared, ROOT)}"')
        metrics, outputs, step = _official_evaluate_export(trm, tmp / "official", tmp / "data", tmp / "official_eval",
                                                           ["preds", "q_halt_logits", "puzzle_identifiers"])
        exported = torch.load(next((tmp / "official").glob("step_*")))
        flat = {k: ({n: float(x) for n, x in v.items()} if isinstance(v, dict) else float(v)) for k, v in (metrics or {}).items()}
        record = {"metrics": flat, "step": step, "exported": tensor_digests(exported),
                  "outputs": {k: v.to(torch.uint8) if k == "preds" else v for k, v in outputs.items()},
                  "submission": json.loads(next((tmp / "official_eval").glob("evaluator_ARC*/submission.json")).read_text())}
        torch.save(record, where / "official_eval.pt")
    return where


# ------------------------------------------------------------------ DIS's own training

DIS_STEPS = 80


def record_dis_official(dis_repo: Path, out: Path = FIXTURES) -> Path:
    """The DIS repository's model (TinyRecursiveReasoningModel_ACTV5 under ACTLossHeadV4) built,
    trained and saved by its own training script's functions (`init_train_state`, `train_batch`,
    `save_train_state`: `step_N.pth`, compiled-style keys) on a Sudoku set built by its own
    builder, and evaluated by its own `evaluate`."""
    where = out / "dis_sudoku"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    _build_sudoku(dis_repo, where)
    use_repo(dis_repo)
    os.environ["DISABLE_COMPILE"] = "1"  # compiled-style keys come from _Compiled below, not from torch.compile on CPU
    import train_arc_tiny_corrupt as dis_train

    a = dict(ARCH, L_layers=1, H_layers=0, puzzle_emb_len=0)
    arch = dis_train.ArchConfig(**{k: v for k, v in a.items() if k in dis_train.ArchConfig.__dataclass_fields__},
                                N_supervision=a["halt_max_steps"])
    config = dis_train.PretrainConfig(arch=arch, data_paths=[str(where / "data")], evaluators=[], global_batch_size=4, epochs=1,
                                      lr=3e-3, lr_warmup_steps=2, checkpoint_path=str(where / "official_eval"),
                                      eval_interval=None, eval_save_outputs=["preds", "q_halt_logits", "puzzle_identifiers"])
    real_torch = dis_train.torch
    dis_train.torch = _CpuTorch()
    try:
        torch.manual_seed(config.seed)
        train, train_meta = dis_train.create_dataloader(config, "train", rank=0, world_size=1, test_set_mode=False,
                                                        epochs_per_iter=40, global_batch_size=4)
        state = dis_train.init_train_state(config, train_meta, rank=0, world_size=1)
        state.model, state.total_steps = _Compiled(state.model), DIS_STEPS
        state.model.train()
        for _, batch, gbs in train:
            if state.step >= DIS_STEPS:
                break
            dis_train.train_batch(config, state, batch, gbs, rank=0, world_size=1)
        dis_train.save_train_state(config, state)  # official_eval/step_N.pth
        test, test_meta = dis_train.create_dataloader(config, "test", rank=0, world_size=1, test_set_mode=True,
                                                      epochs_per_iter=1, global_batch_size=4)
        state.model.eval()
        metrics = dis_train.evaluate(config, state, test, test_meta, [], rank=0, world_size=1, cpu_group=None)
    finally:
        dis_train.torch = real_torch
    ckpt = where / "official_eval" / f"step_{state.step}.pth"
    shutil.move(ckpt, where / ckpt.name)
    # Its save_code_and_config writes all_config.yaml this way (asdict of the dataclasses).
    from dataclasses import asdict

    (where / "all_config.yaml").write_text(yaml.dump(asdict(config)))
    outputs = torch.load(where / "official_eval" / f"step_{state.step}_all_preds.0.pth")
    shutil.move(where / "official_eval" / f"step_{state.step}_all_preds.0.pth", where / "official_eval" / f"step_{state.step}_all_preds.0")
    _record(metrics, outputs, state, where)
    return where


def _init_gloo() -> None:
    # The ARC evaluator gathers votes with torch.distributed even in a single process.
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)


# Arch and training of the trm_arc_solved fixture: enough steps and width that the model copies
# its input exactly, so the official evaluation solves the held-out copy task (pass@K > 0).
# One cycle of each level and 2 supervision steps keep 600 steps of 900-token sequences to about
# a CPU minute.
ARC_SOLVED = dict(arch=dict(ARCH, hidden_size=32, puzzle_emb_ndim=32, L_layers=1, H_layers=0, puzzle_emb_len=1,
                            H_cycles=1, L_cycles=1, halt_max_steps=2),
                  train=dict(steps=600, lr=1e-2, batch_size=4, epochs_per_iter=1000))
KEEP = ["preds", "q_halt_logits", "puzzle_identifiers"]
ARC_EVALUATORS = [{"name": "arc@ARC", "pass_Ks": [1, 2, 5]}]
# name -> (model, dataset builder, arch, official evaluators, outputs kept, training options)
CASES = {
    "trm_sudoku": ("trm", _build_sudoku, dict(ARCH, L_layers=1, H_layers=0, puzzle_emb_len=0), [], KEEP, {}),
    "trm_arc": ("trm", _build_arc, dict(ARCH, L_layers=1, H_layers=0, puzzle_emb_len=2, puzzle_emb_ndim=24), ARC_EVALUATORS, KEEP, {}),
    "hrm_sudoku": ("hrm", _build_sudoku, dict(ARCH, L_layers=1, H_layers=1), [], KEEP, {}),
    # 300 steps: the model copies walls, open cells, S and G (not yet the path), so its answers
    # hold several tokens; 12 mazes in batches of 4 are 3 steps an epoch.
    "trm_maze": ("trm", _build_maze, dict(ARCH, L_layers=1, H_layers=0, puzzle_emb_len=0), [], KEEP,
                 dict(steps=300, lr=3e-3, epochs_per_iter=200)),
    "trm_arc_solved": ("trm", _build_arc_solvable, ARC_SOLVED["arch"], ARC_EVALUATORS, KEEP, ARC_SOLVED["train"]),
}


def record_all(trm: Path, out: Path = FIXTURES, dis: Path | None = None, only: list[str] | None = None) -> list[Path]:
    """Every fixture (or those named in `only`): the official TRM/HRM checkpoints, the dis ->
    official proof (needs trm_arc, recorded first) and, given a DIS checkout, DIS's own checkpoint."""
    _stub_unused_imports()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    written = []
    wanted = lambda name: only is None or name in only  # noqa: E731
    try:
        _init_gloo()
        for name, (kind, build, arch, evaluators, keep, train) in CASES.items():
            if not wanted(name):
                continue
            where = out / name
            shutil.rmtree(where, ignore_errors=True)
            where.mkdir(parents=True)
            build(trm, where)
            _train_and_evaluate(kind, trm, where, arch, evaluators, keep, **train)
            written.append(where)
        if wanted("dis_export_arc"):
            written.append(record_dis_export(trm, out))
        if dis is not None and wanted("dis_sudoku"):
            written.append(record_dis_official(dis, out))
    finally:
        torch.set_num_threads(threads)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trm", type=Path, default=os.environ.get("DIS_OFFICIAL_TRM"), help="checkout of TinyRecursiveModels")
    ap.add_argument("--dis", type=Path, default=os.environ.get("DIS_OFFICIAL_DIS"),
                    help="checkout of Deep-Improvement-Supervision (the dis_sudoku fixture; skipped without it)")
    ap.add_argument("--out", type=Path, default=FIXTURES)
    ap.add_argument("--only", action="append", metavar="NAME", help="record only this fixture (repeatable): "
                    + ", ".join([*CASES, "dis_export_arc", "dis_sudoku"]))
    args = ap.parse_args()
    if args.trm is None:
        ap.error("pass --trm or set DIS_OFFICIAL_TRM")
    for path in record_all(args.trm, args.out, args.dis, args.only):
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"{path}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
