"""plan_import: reading, validating and resampling externally written plans."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dis_core.contract.errors import DataError, UserError
from dis_core.contract.interfaces import IGNORE, BuildContext
from dis_core.wiring.plugins import load_registry
from dis_plugins.plan_import import PlanImport, PlanImportConfig, build_plan_import, resample_index
from dis_plugins.tasks.sudoku import SudokuConfig, build_sudoku

N_SUP = 4


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    cfg = SudokuConfig(size=4, num_train=6, num_test=3, num_augmentations=0)
    return build_sudoku(cfg, BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path_factory.mktemp("data")))


def _ctx(task, tmp_path):
    return BuildContext(seed=0, n_sup=N_SUP, data_dir=tmp_path, task=task, component="$.targets", registry=REGISTRY)


REGISTRY = load_registry()  # the fallback is built through it


def _example(task, i, split="train"):
    b = task.dataset(split).get(np.array([i]))
    return b["inputs"][0].tolist(), b["labels"][0].tolist()


def _write(tmp_path, records, name="plans.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _batch(task, ids):
    return {k: torch.from_numpy(v) for k, v in task.dataset("train").get(np.asarray(ids)).items()}


def _ladder(x, y, k):
    """k steps from x to y, revealing cells left to right."""
    diff = [i for i in range(len(x)) if x[i] != y[i]]
    steps = []
    for s in range(1, k + 1):
        cut = len(diff) * s // k
        steps.append([y[i] if i in diff[:cut] else x[i] for i in range(len(x))])
    return steps


def test_resample_index():
    assert resample_index(6, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert resample_index(12, 6).tolist() == [1, 3, 5, 7, 9, 11]
    assert resample_index(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert resample_index(1, 3).tolist() == [0, 0, 0]


def test_valid_file_flat_and_nested_resampled(task, tmp_path):
    x0, y0 = _example(task, 0)
    x1, y1 = _example(task, 1)
    long_plan = _ladder(x0, y0, 8)  # 8 steps -> 4 frames: steps 1, 3, 5, 7
    nested = [[row[r * 4:(r + 1) * 4] for r in range(4)] for row in _ladder(x1, y1, 2)]
    nested[0][0][0] = None  # unset in an intermediate step
    path = _write(tmp_path, [
        {"example_id": 0, "split": "train", "steps": long_plan, "meta": {"by": "test"}},
        {"example_id": 1, "steps": nested},
        "",
        {"example_id": 0, "split": "test", "steps": [_example(task, 0, "test")[1]]},
    ])
    gen = build_plan_import(PlanImportConfig(path=str(path)), _ctx(task, tmp_path))
    assert gen.monotone is False
    out = gen(_batch(task, [1, 0]), N_SUP, torch.Generator().manual_seed(0))
    assert out.shape == (2, N_SUP, 16)
    assert out[1].tolist() == [long_plan[i] for i in (1, 3, 5, 7)]
    flat1 = [[v for r in step for v in r] for step in nested]
    flat1[0][0] = IGNORE
    assert out[0].tolist() == [flat1[0], flat1[0], flat1[1], flat1[1]]
    rep = gen.report()
    assert rep["plans"] == 2 and rep["skipped_other_split"] == 1 and rep["served_planned"] == 2
    assert rep["steps_min"] == 2 and rep["steps_max"] == 8


@pytest.mark.parametrize(
    "record, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"example_id": 0, "steps": "Y", "notes": 1}, "unknown key"),
        ({"example_id": -1, "steps": "Y"}, "example_id must be"),
        ({"example_id": True, "steps": "Y"}, "example_id must be"),
        ({"example_id": 0, "split": "dev", "steps": "Y"}, "split must be"),
        ({"example_id": 0, "steps": []}, "non-empty list"),
        ({"example_id": 0, "steps": [[1, 2, 3]]}, "must hold 16 tokens"),
        ({"example_id": 0, "steps": [[[1, 2], [3, 4]]]}, "4 rows of 4"),
        ({"example_id": 0, "steps": [[1.5] * 16, "Y"]}, "integer tokens"),
        ({"example_id": 0, "steps": [[9] * 16, "Y"]}, "outside the vocabulary"),
        ({"example_id": 0, "steps": ["X"]}, "last step differs from the answer"),
        ({"example_id": 0, "steps": "Y-unset"}, "last step differs"),
        ({"example_id": 99, "steps": "Y"}, "outside the train split"),
    ],
)
def test_validation_errors_name_file_and_line(task, tmp_path, record, message):
    x, y = _example(task, 0)
    if isinstance(record, dict):  # "Y" / "X": y* / x of example 0; "Y-unset": y* with a null cell
        steps = record["steps"]
        if isinstance(steps, str):
            steps = {"Y": [y], "Y-unset": [y[:-1] + [None]]}[steps]
        else:
            steps = [{"Y": y, "X": x}.get(s, s) if isinstance(s, str) else s for s in steps]
        record = {**record, "steps": steps}
    ok = {"example_id": 1, "steps": [_example(task, 1)[1]]}
    path = _write(tmp_path, [ok, record])
    with pytest.raises(DataError, match=rf"plans\.jsonl:2: .*{message}"):
        build_plan_import(PlanImportConfig(path=str(path)), _ctx(task, tmp_path))


def test_duplicate_plans(task, tmp_path):
    y = _example(task, 0)[1]
    path = _write(tmp_path, [{"example_id": 0, "steps": [y]}, {"example_id": 0, "steps": [y, y]}])
    with pytest.raises(DataError, match="plans.jsonl:2: a second plan .* line 1"):
        build_plan_import(PlanImportConfig(path=str(path)), _ctx(task, tmp_path))


def test_missing_file_and_relative_path(task, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="nowhere.jsonl not found"):
        build_plan_import(PlanImportConfig(path="nowhere.jsonl"), _ctx(task, tmp_path))
    _write(tmp_path, [{"example_id": 2, "steps": [_example(task, 2)[1]]}], name="rel.jsonl")
    monkeypatch.chdir(tmp_path)
    gen = build_plan_import(PlanImportConfig(path="rel.jsonl"), _ctx(task, tmp_path))
    assert gen.path == tmp_path / "rel.jsonl"


def test_fallback_versus_error(task, tmp_path):
    x, y = _example(task, 0)
    path = _write(tmp_path, [{"example_id": 0, "steps": _ladder(x, y, 4)}])
    batch = _batch(task, [0, 3, 4])
    g = torch.Generator().manual_seed(0)
    final = build_plan_import(PlanImportConfig(path=str(path), fallback="final"), _ctx(task, tmp_path))
    out = final(batch, N_SUP, g)
    assert (out[1:] == batch["labels"][1:, None]).all()  # labels at every step
    assert out[0].tolist() == _ladder(x, y, 4)
    assert final.report()["served_fallback"] == 2
    reveal = build_plan_import(PlanImportConfig(path=str(path)), _ctx(task, tmp_path))  # reveal_path by default
    out = reveal(batch, N_SUP, g)
    assert (out[:, -1] == batch["labels"]).all()
    assert (out[1:, 0] != batch["labels"][1:]).any()  # the first frame is not y* yet
    strict = build_plan_import(PlanImportConfig(path=str(path), on_missing="error"), _ctx(task, tmp_path))
    assert (strict(_batch(task, [0]), N_SUP, g)[0, -1] == batch["labels"][0]).all()
    with pytest.raises(DataError, match="no plan for train example id.* 3, 4"):
        strict(batch, N_SUP, g)
    with pytest.raises(UserError, match=r"^\$\.targets\.config\.fallback: unknown target_generator 'nope'; .*final"):
        build_plan_import(PlanImportConfig(path=str(path), fallback="nope"), _ctx(task, tmp_path))
    with pytest.raises(UserError, match=r"extra fields found \(x\) @ \$\.targets\.config\.fallback_config"):
        build_plan_import(PlanImportConfig(path=str(path), fallback="final", fallback_config={"x": 1}), _ctx(task, tmp_path))


def test_fallback_instance():
    class Zeros:
        monotone = True

        def __call__(self, batch, n_sup, generator):
            return torch.zeros(batch["labels"].shape[0], n_sup, batch["labels"].shape[1], dtype=torch.int64)

    plan = np.array([[5, 5], [3, 4]])
    gen = PlanImport(None, np.array([7]), [plan], 2, fallback=Zeros(), labels=np.array([[3, 4]]))
    batch = {"labels": torch.tensor([[3, 4], [1, 1]]), "example_ids": torch.tensor([7, 8])}
    assert gen(batch, 2, torch.Generator()).tolist() == [[[5, 5], [3, 4]], [[0, 0], [0, 0]]]


def test_monotonicity_report(task, tmp_path):
    x0, y0 = _example(task, 0)
    x1, y1 = _example(task, 1)
    wobbly = [y1, x1, y1]  # goes to y*, away, back again
    path = _write(tmp_path, [{"example_id": 0, "steps": _ladder(x0, y0, 4)}, {"example_id": 1, "steps": wobbly}])
    rep = build_plan_import(PlanImportConfig(path=str(path)), _ctx(task, tmp_path)).report()
    assert rep["monotone_share"] == 0.5
    d0 = [sum(a != b for a, b in zip(step, y0)) for step in _ladder(x0, y0, 4)]
    d1 = [sum(a != b for a, b in zip(wobbly[i], y1)) for i in resample_index(3, N_SUP)]
    assert rep["per_step_mean_distance"] == pytest.approx([(a + b) / 2 for a, b in zip(d0, d1)])
    assert rep["per_step_mean_distance"][-1] == 0
