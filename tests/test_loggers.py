"""Experiment trackers (issue 10): the `tensorboard`, `wandb` and `mlflow` loggers, offline, read
back from what they wrote; a run without `[[loggers]]` is unchanged; a tracker failing mid-run
is dropped, not fatal. The three packages come with the `test` extra (`pip install -e '.[test]'`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dis_core import hookimpl
from dis_core.contract.errors import UserError
from dis_core.wiring.recipe import load_recipe
from dis_core.loop.trainer import Trainer

from conftest import tiny_recipe

LOGGERS = """
[[loggers]]
name = "tensorboard"
[[loggers]]
name = "wandb"
config = {{ mode = "offline", project = "dis-test", dir = "{wandb_dir}" }}
[[loggers]]
name = "mlflow"
config = {{ tracking_uri = "{mlflow_uri}", experiment = "dis-test" }}
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker writes under tmp_path and never reaches a server."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


def _rows(run: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def _items(items) -> dict:
    """W&B's key/value protobuf items as a dict (a key is `key`, or the path `nested_key`)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file (a LevelDB-style log: 32 KiB blocks of records,
    each crc32, length, type FULL/FIRST/MIDDLE/LAST, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + chunk
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        pending = b""
        yield record


def test_three_trackers_receive_rows_recipe_run_json_and_trajectories(offline, registry):
    tmp = offline
    extra = LOGGERS.format(wandb_dir=tmp / "wandb", mlflow_uri=(tmp / "mlruns").as_uri())
    recipe = tiny_recipe(tmp, steps=6, extra=extra)
    resolved = load_recipe(recipe, registry, ["train.eval_interval=3", "train.eval_trajectories=2"])
    run = tmp / "run"
    summary = Trainer(resolved, registry, run, data_dir=tmp / "data").fit(registry)
    losses = [(r["step"], r["train/loss"]) for r in _rows(run, "train")]
    evals = _rows(run, "eval")
    assert len(losses) == 6 and [r["step"] for r in evals] == [3, 6]
    assert sorted(p.name for p in (run / "eval" / "step_6" / "trajectories").glob("*.png")) == ["example_000007.png", "example_000009.png"]  # random, seed 0

    # TensorBoard: the event file holds the run's losses and evaluation metrics, and the pictures.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    _same([(e.step, e.value) for e in acc.Scalars("train/loss")], losses)  # fp32 in the event file
    assert [e.value for e in acc.Scalars("nqueens/valid_solution_rate")] == pytest.approx(
        [r["nqueens/valid_solution_rate"] for r in evals])
    assert {"trajectories/example_000007", "trajectories/example_000009"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("trajectories/example_000007")] == [3, 6]  # the same example at each evaluation
    assert {"recipe/text_summary", "run.json/text_summary", "summary/text_summary"} <= set(acc.Tags()["tensors"])

    # W&B offline: history rows, config, the saved files and the images.
    (offline_run,) = (tmp / "wandb" / "wandb").glob("offline-run-*")
    records = list(wandb_records(next(offline_run.glob("run-*.wandb"))))
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    logged = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    _same(logged, losses)
    assert [h["nqueens/valid_solution_rate"] for h in history if "nqueens/valid_solution_rate" in h] == pytest.approx(
        [r["nqueens/valid_solution_rate"] for r in evals])
    config = {k: v for r in records if r.WhichOneof("record_type") == "run" for k, v in _items(r.run.config.update).items()}
    assert config["recipe"]["train"]["global_batch_size"] == 8 and config["run"]["world_size"] == 1
    assert {"recipe.toml", "run.json"} <= {p.name for p in (offline_run / "files").iterdir()}
    assert len(list((offline_run / "files" / "media" / "images").glob("*.png"))) == 4  # 2 pictures x 2 evaluations
    summaries = [_items(r.summary.update) for r in records if r.WhichOneof("record_type") == "summary"]
    assert any(s.get("nqueens/valid_solution_rate") == summary["nqueens/valid_solution_rate"] for s in summaries)

    # MLflow file store: params, metric history, artifacts, status.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("dis-test").experiment_id])
    rid = found.info.run_id
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["train.global_batch_size"] == "8" and found.data.params["task.name"] == "nqueens"
    _same([(m.step, m.value) for m in client.get_metric_history(rid, "train/loss")], losses)
    assert "exact/hamming_at_3" in found.data.metrics  # `@` is not allowed in MLflow names
    assert {"recipe.toml", "run.json", "summary.json", "trajectories"} <= {a.path for a in client.list_artifacts(rid)}
    assert len(client.list_artifacts(rid, "trajectories/step_6")) == 2


def test_a_run_without_loggers_writes_nothing_more(tmp_path, registry):
    run = tmp_path / "run"
    Trainer(load_recipe(tiny_recipe(tmp_path, steps=3), registry), registry, run, data_dir=tmp_path / "data").fit(registry)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "metrics.jsonl", "recipe.toml", "run.json", "summary.json"]


class _Flaky:
    """A logger plugin whose tracker fails after two rows."""

    calls: list = []

    def start(self, run_dir, recipe, info):
        self.calls.append("start")

    def log(self, row):
        self.calls.append(row["step"])
        if len(self.calls) > 2:
            raise ConnectionError("tracker unreachable")

    def images(self, step, paths):
        pass

    def finish(self, summary):
        self.calls.append("finish")


class FlakyPlugin:
    @hookimpl
    def register_loggers(self, register):
        import attrs

        @attrs.frozen(kw_only=True)
        class FlakyConfig:
            pass

        register("flaky", FlakyConfig, lambda config, ctx: _Flaky())


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_finishes(tmp_path):
    from dis_core.wiring.plugins import load_registry

    registry = load_registry(extra_plugins=(FlakyPlugin(),))
    _Flaky.calls = []
    recipe = tiny_recipe(tmp_path, steps=5, extra='\n[[loggers]]\nname = "flaky"\n')
    summary = Trainer(load_recipe(recipe, registry), registry, tmp_path / "run", data_dir=tmp_path / "data").fit(registry)
    assert summary["step"] == 5 and len(_rows(tmp_path / "run", "train")) == 5
    assert _Flaky.calls == ["start", 1, 2]  # dropped at its failure: no more rows, no finish


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_names_the_extra(name, package, monkeypatch, tmp_path):
    """Building a tracker whose package is not installed names the extra of dis that installs it,
    one pyproject.toml declares with that package."""
    import re
    import sys
    import tomllib

    from dis_core.contract.interfaces import BuildContext
    from dis_core.wiring.plugins import load_registry

    from conftest import ROOT

    entry = load_registry().get("logger", name)
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now raises ImportError
    message = rf"^logger '{name}' needs the `{package}` package .*install it with: pip install 'dis\[\w+\]'$"
    with pytest.raises(UserError, match=message) as info:
        entry.factory(entry.config_cls(), BuildContext(seed=0, n_sup=2, data_dir=tmp_path, component="$.loggers[0]"))
    extra = re.search(r"dis\[(\w+)\]", str(info.value)).group(1)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(rf"{package}(-skinny)?\b", dep) for dep in extras.get(extra, [])), (extra, extras)


def test_mlflow_metric_names():
    from dis_plugins.loggers import mlflow_key

    assert mlflow_key("exact/hamming@3") == "exact/hamming_at_3" and mlflow_key("train/loss") == "train/loss"
