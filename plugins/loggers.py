"""Loggers `tensorboard`, `wandb` and `mlflow`: experiment trackers fed with the rows of
metrics.jsonl, the resolved recipe, run.json, the trajectory PNGs and summary.json.

Each needs its package, an optional extra: `pip install 'dis[tensorboard]'`, `'dis[wandb]'`,
`'dis[mlflow]'` (mlflow-skinny, the client). A recipe naming a logger whose package is missing
stops before training with exit status 2 and the pip command. Everything is written locally by
default (TensorBoard event files and an MLflow file store under the run directory; W&B follows
`WANDB_MODE`, e.g. `offline`), so a run never needs a server unless the recipe names one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal

import attrs

from dis_core import hookimpl
from dis_core.contract.errors import UserError
from dis_core.outputs.loggers import numeric


def _require(module: str, extra: str, logger: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"logger {logger!r} needs the `{module.split('.')[0]}` package ({exc}); "
                        f"install it with: pip install 'dis[{extra}]'") from None


def _read_png(path: Path):
    import matplotlib.image

    img = matplotlib.image.imread(str(path))  # (H, W, 3|4) floats in [0, 1]
    return img[..., :3]


# ------------------------------------------------------------------ TensorBoard


@attrs.frozen(kw_only=True)
class TensorBoardConfig:
    log_dir: str = ""  # "" = RUN_DIR/tensorboard
    flush_secs: int = 30


class TensorBoardLogger:
    """Scalars under their metrics.jsonl names (`train/loss`, `nqueens/valid_solution_rate`,
    ...) at their step; the recipe (TOML) and run.json as text; trajectory PNGs as images."""

    def __init__(self, config: TensorBoardConfig):
        self.config = config
        self.writer = None

    def start(self, run_dir: Path, recipe: dict, info: dict) -> None:
        import tomli_w

        tb = _require("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.log_dir = Path(self.config.log_dir) if self.config.log_dir else run_dir / "tensorboard"
        self.writer = tb.SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.config.flush_secs)
        self.writer.add_text("recipe", "```toml\n" + tomli_w.dumps(recipe) + "\n```", 0)
        self.writer.add_text("run.json", "```json\n" + json.dumps(info, indent=1, default=str) + "\n```", 0)

    def log(self, row: dict) -> None:
        for key, value in numeric(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def images(self, step: int, paths: list[Path]) -> None:
        for path in paths:
            self.writer.add_image(f"trajectories/{path.stem}", _read_png(path), step, dataformats="HWC")
        self.writer.flush()

    def finish(self, summary: dict | None) -> None:
        if summary is not None:
            self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=1, default=str) + "\n```", summary.get("step", 0))
        self.writer.close()


def build_tensorboard(config: TensorBoardConfig, ctx) -> TensorBoardLogger:
    """TensorBoard event files (default RUN_DIR/tensorboard): scalars, recipe, run.json, trajectory images."""
    _require("tensorboard", "tensorboard", "tensorboard")
    return TensorBoardLogger(config)


# ------------------------------------------------------------------ Weights & Biases


@attrs.frozen(kw_only=True)
class WandbConfig:
    project: str = "dis"
    entity: str = ""  # "" = the account's default
    name: str = ""  # "" = the run directory's name
    group: str = ""
    tags: tuple[str, ...] = ()
    mode: Literal["", "online", "offline", "disabled"] = ""  # "" = WANDB_MODE, else online
    dir: str = ""  # where wandb keeps its files; "" = RUN_DIR


class WandbLogger:
    """One W&B run per run directory (its id is derived from the directory's path, so `--resume`
    continues it); config = the resolved recipe, run.json and recipe.toml saved as files, metrics
    at their step, trajectory PNGs as images, summary.json as the run summary."""

    def __init__(self, config: WandbConfig):
        self.config = config
        self.run = None

    def start(self, run_dir: Path, recipe: dict, info: dict) -> None:
        wandb = _require("wandb", "wandb", "wandb")
        c = self.config
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=c.project, entity=c.entity or None, name=c.name or run_dir.name, group=c.group or None,
            tags=list(c.tags) or None, mode=c.mode or None, dir=c.dir or str(run_dir), id=run_id, resume="allow",
            config={"recipe": recipe, "run": {k: v for k, v in info.items() if k != "recipe"}},
        )
        for name in ("recipe.toml", "run.json"):
            if (run_dir / name).is_file():
                self.run.save(str(run_dir / name), base_path=str(run_dir), policy="now")

    def log(self, row: dict) -> None:
        self.run.log(numeric(row), step=row["step"])

    def images(self, step: int, paths: list[Path]) -> None:
        import wandb

        self.run.log({"trajectories": [wandb.Image(str(p), caption=p.stem) for p in paths]}, step=step)

    def finish(self, summary: dict | None) -> None:
        if summary is not None:
            self.run.summary.update(numeric(summary))
        self.run.finish(exit_code=0 if summary is not None else 1)


def build_wandb(config: WandbConfig, ctx) -> WandbLogger:
    """Weights & Biases (online, or offline with WANDB_MODE=offline / mode = "offline")."""
    _require("wandb", "wandb", "wandb")
    return WandbLogger(config)


# ------------------------------------------------------------------ MLflow


@attrs.frozen(kw_only=True)
class MlflowConfig:
    tracking_uri: str = ""  # "" = a file store in RUN_DIR/mlruns; or http://..., sqlite:///...
    experiment: str = "dis"
    run_name: str = ""  # "" = the run directory's name


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + ".")
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def mlflow_key(key: str) -> str:
    """MLflow metric names allow letters, digits and `_-. /`: `hamming@3` becomes `hamming_at_3`."""
    return key.replace("@", "_at_")


class MlflowLogger:
    """One MLflow run: the recipe's keys as params, metrics at their step (`@` spelled `_at_`),
    recipe.toml, run.json, summary.json and the trajectory PNGs as artifacts."""

    def __init__(self, config: MlflowConfig):
        self.config = config
        self.client = self.run_id = None

    def start(self, run_dir: Path, recipe: dict, info: dict) -> None:
        _require("mlflow", "mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.config.tracking_uri or (run_dir.resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in "maintenance mode" behind this switch; a local
            # file store in the run directory is what this logger is for by default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.config.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.config.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=self.config.run_name or run_dir.name).info.run_id
        params = [Param(k[:250], v[:6000]) for k, v in _flat(recipe).items()]
        for i in range(0, len(params), 100):  # the API's limit per batch
            self.client.log_batch(self.run_id, params=params[i: i + 100])
        for name in ("recipe.toml", "run.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, row["step"]) for k, v in numeric(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 1000])

    def images(self, step: int, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=f"trajectories/step_{step}")

    def finish(self, summary: dict | None) -> None:
        if summary is not None:
            self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED")


def build_mlflow(config: MlflowConfig, ctx) -> MlflowLogger:
    """MLflow tracking (default: a file store in RUN_DIR/mlruns): params, metrics, artifacts."""
    _require("mlflow", "mlflow", "mlflow")
    return MlflowLogger(config)


@hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardConfig, build_tensorboard)
    register("wandb", WandbConfig, build_wandb)
    register("mlflow", MlflowConfig, build_mlflow)
