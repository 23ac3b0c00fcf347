"""`dis adapt`: new rows for unseen ARC tasks, trained on their demonstrations only, voted, submitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dis_core.contract.errors import DataError, UserError
from dis_core.loop.trainer import Trainer
from dis_core.tools import adapt as adapt_mod
from dis_core.tools import cli
from dis_core.tools.inference import read_checkpoint, locate
from dis_core.wiring.recipe import load_recipe
from dis_plugins.tasks.arc import adapt_data
from dis_plugins.tasks.arc.adapt_data import LeakageError

from conftest import tiny_arc_recipe, tiny_recipe

DEMO, TEST_SIDE = 2, 5  # demonstration outputs are 2x2, test outputs 5x5: a leaked output shows by its size


def _grid(rng, side):
    return rng.integers(1, 4, (side, side)).tolist()  # no black: every cell of a grid is a colour token


def _task(rng, n_train=3):
    return {"train": [{"input": _grid(rng, 2), "output": _grid(rng, DEMO)} for _ in range(n_train)],
            "test": [{"input": _grid(rng, 2), "output": _grid(rng, TEST_SIDE)}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny trained ARC run and two new tasks in Kaggle layout (challenges without outputs,
    solutions beside them)."""
    from dis_core.wiring.plugins import load_registry

    root = tmp_path_factory.mktemp("adapt")
    rng = np.random.default_rng(0)
    for folder, names in {"tr": ["a1", "a2"], "te": ["e1"]}.items():
        (root / folder).mkdir()
        for n in names:
            (root / folder / f"{n}.json").write_text(json.dumps(_task(rng)))
    new = {n: _task(rng) for n in ("n1", "n2")}
    (root / "k_test_challenges.json").write_text(json.dumps(
        {n: {"train": t["train"], "test": [{"input": p["input"]} for p in t["test"]]} for n, t in new.items()}))
    (root / "k_test_solutions.json").write_text(json.dumps({n: [p["output"] for p in t["test"]] for n, t in new.items()}))
    tiny_arc_recipe(root / "arc.toml", root / "tr", root / "te")
    registry = load_registry()
    Trainer(load_recipe(root / "arc.toml", registry), registry, root / "base", data_dir=root / "data").fit(registry)
    return root, registry, new


def _run(base, out, **options):
    root, registry, _ = base
    options.setdefault("steps", 2)
    options.setdefault("threads", 1)
    return adapt_mod.adapt(root / "base", root / "k_test_challenges.json", out, registry=registry, data_dir=root / "data",
                           device="cpu", **options)


def _saved(run):
    return read_checkpoint(locate(run)[1])


def test_embedding_only_adds_rows_keeps_the_network_and_writes_a_submission(base, tmp_path):
    root, _, new = base
    report = _run(base, tmp_path / "ad", ablations=("blank", "random"))
    before, after = _saved(root / "base"), _saved(tmp_path / "ad")
    first = before["puzzle_emb"]["weights"].shape[0]
    table = after["puzzle_emb"]["weights"]
    assert report["new_rows"] == table.shape[0] - first > 2 and report["base"]["table_rows"] == first
    assert torch.equal(table[:first], before["puzzle_emb"]["weights"])  # the trained rows are untouched
    mean = before["puzzle_emb"]["weights"][1:].mean(0)
    assert not torch.allclose(table[first:], mean.expand_as(table[first:]))  # the new rows moved from the mean
    for key, value in before["module"].items():  # the network is bit-identical
        assert torch.equal(after["module"][key], value), key
    submission = json.loads((tmp_path / "ad" / "submission.json").read_text())
    assert sorted(submission) == sorted(new) and all(set(s[0]) == {"attempt_1", "attempt_2"} for s in submission.values())
    assert report["scored"] and "arc/pass@2" in report["metrics"] and "exact/accuracy" in report["metrics"]
    assert set(report["ablations"]) == {"blank", "random"} and "arc/pass@1" in report["ablations"]["random"]
    saved = json.loads((tmp_path / "ad" / "adapt.json").read_text())
    assert saved["leakage"]["base_saw"]["checked"] and saved["leakage"]["base_saw"]["tasks_with_test_pair_seen"] == []


def test_full_and_adapter_modes_and_row_inits(base, tmp_path):
    root, registry, _ = base
    before = _saved(root / "base")
    _run(base, tmp_path / "full", train="full", init="zeros", lr=1e-2)
    full = _saved(tmp_path / "full")
    assert any(not torch.equal(full["module"][k], v) for k, v in before["module"].items())  # the network trained
    report = _run(base, tmp_path / "lora", train="adapter", init="nearest", lr=1e-2, adapter_rank=2)
    lora = _saved(tmp_path / "lora")
    assert report["init"]["init"] == "nearest" and len(report["init"]["chosen_per_task"]) == 2
    assert 0 < report["trained_network_params"] < report["network_params"]
    for key, value in before["module"].items():  # the trained weights stay; only the adapter moved
        assert torch.equal(lora["module"][key], value), key
    b = [v for k, v in lora["module"].items() if ".lowrank_adapter.B." in k]
    assert b and any(v.abs().sum() > 0 for v in b)
    model = adapt_mod.load(tmp_path / "lora", registry=registry, device="cpu", data_dir=root / "data")
    assert model.solver.backbone.lowrank_adapter.rank == 2
    answers = model.predict([{"input": [[1, 2], [3, 1]], "task_id": "n1"}])
    assert isinstance(answers[0]["answer"], list)


def test_leakage_guard_no_test_output_in_any_training_batch(base, tmp_path, monkeypatch):
    """Every training batch of an adaptation holds demonstration outputs only (2x2: 4 colour
    cells under any variant and placement); with the split rule broken to include test pairs the
    guard stops the run, and without the guard the 5x5 test outputs would be in the batches."""
    seen = []
    get = adapt_data.AdaptTrainSplit.get

    def recording(self, indices):
        batch = get(self, indices)
        seen.append((batch["labels"] >= 2).sum(1))
        return batch

    monkeypatch.setattr(adapt_data.AdaptTrainSplit, "get", recording)
    _run(base, tmp_path / "ok")
    counts = np.concatenate(seen)
    assert len(counts) > 0 and set(counts.tolist()) == {DEMO * DEMO}

    # A broken split rule (as strict_split's inverse would be): groups take their test pairs too.
    init = adapt_data.AdaptTrainSplit.__init__

    def broken(self, corpus, *args):
        init(self, corpus, *args)
        inner = self.inner
        inner.group_size = corpus.n_train[inner.group_puzzle] + corpus.n_test[inner.group_puzzle]
        inner.example_offset = np.concatenate([[0], np.cumsum(inner.group_size)])

    monkeypatch.setattr(adapt_data.AdaptTrainSplit, "__init__", broken)
    with pytest.raises(LeakageError, match="test pair 0 of task n"):
        _run(base, tmp_path / "leaky")
    seen.clear()
    monkeypatch.setattr(adapt_data.AdaptTrainSplit, "guard", lambda self, puz, e: None)  # the guard off: the leak is real
    _run(base, tmp_path / "unguarded")
    assert TEST_SIDE * TEST_SIDE in set(np.concatenate(seen).tolist())


def test_a_demonstration_that_is_a_test_pair_is_refused(base, tmp_path):
    root, registry, new = base
    task = dict(new["n1"])
    task["train"] = [*task["train"], task["test"][0]]  # the answer planted among the demonstrations
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "n1.json").write_text(json.dumps(task))
    with pytest.raises(LeakageError, match="demonstration pair 3 of task n1 .* test pair 0 of task n1"):
        adapt_mod.adapt(root / "base", tmp_path / "tasks", tmp_path / "ad", registry=registry, data_dir=root / "data",
                        device="cpu", steps=2, threads=1)


def test_the_report_says_what_the_base_trained_on(base, tmp_path):
    root, registry, _ = base
    report = adapt_mod.adapt(root / "base", root / "te", tmp_path / "ad", registry=registry, data_dir=root / "data",
                             device="cpu", steps=1, threads=1)
    saw = report["leakage"]["base_saw"]
    assert saw["tasks_with_id_trained"] == ["e1"] and saw["per_task"]["e1"]["id_trained"] == "demonstrations"
    assert saw["tasks_with_demos_seen"] == ["e1"] and saw["tasks_with_test_pair_seen"] == []


def test_resume_after_a_kill_gives_the_uninterrupted_result(base, tmp_path, monkeypatch):
    _run(base, tmp_path / "whole", steps=4, checkpoint_interval=2)
    step = Trainer.train_step
    calls = {"n": 0}

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt("killed")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(base, tmp_path / "cut", steps=4, checkpoint_interval=2)
    monkeypatch.setattr(Trainer, "train_step", step)
    report = adapt_mod.adapt(None, None, tmp_path / "cut", registry=base[1], data_dir=base[0] / "data", device="cpu", resume=True)
    assert report["cost"]["steps"] == 4
    whole, cut = _saved(tmp_path / "whole"), _saved(tmp_path / "cut")
    assert torch.equal(whole["puzzle_emb"]["weights"], cut["puzzle_emb"]["weights"])
    assert json.loads((tmp_path / "cut" / "submission.json").read_text()) == json.loads((tmp_path / "whole" / "submission.json").read_text())


def test_user_mistakes_exit_2_naming_the_file(base, tmp_path, capsys):
    root, _, _ = base
    bad = tmp_path / "x_test_challenges.json"
    bad.write_text("{not json")
    big = tmp_path / "big"
    big.mkdir()
    (big / "huge.json").write_text(json.dumps({"train": [{"input": [[1] * 31] * 31, "output": [[1]]}], "test": [{"input": [[1]]}]}))
    other = tmp_path / "nq"
    Trainer(load_recipe(tiny_recipe(tmp_path, steps=1), base[1]), base[1], other, data_dir=tmp_path / "data").fit(base[1])
    cases = [([str(root / "base"), str(tmp_path / "missing.json")], "missing.json"),
             ([str(root / "base"), str(bad)], "not valid JSON"),
             ([str(root / "base"), str(big)], "task huge: train pair 0 input: grid of shape 31x31"),
             ([str(other), str(root / "k_test_challenges.json")], "puzzle embedding"),
             ([str(root / "base"), str(root / "k_test_challenges.json"), "--train", "adapter", "--ablation", "none"], "ablation")]
    for args, words in cases:
        out = tmp_path / f"o{len(words)}"
        assert cli.main(["adapt", *args, "--out", str(out), "--steps", "1", "--threads", "1", "--data-dir", str(root / "data")]) == 2
        assert words in capsys.readouterr().err, words


def test_read_tasks_accepts_a_single_file_and_marks_unknown_outputs(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}))
    puzzles, known = adapt_data.read_tasks(tmp_path / "t.json")
    assert [p.task_id for p in puzzles] == ["t"] and known == [(False,)]
    with pytest.raises(DataError, match="no demonstration"):
        (tmp_path / "e.json").write_text(json.dumps({"train": [], "test": [{"input": [[3]]}]}))
        adapt_data.read_tasks(tmp_path / "e.json")
    with pytest.raises(UserError, match="TASKS must be"):
        adapt_data.read_tasks(tmp_path / "nothing.txt")


def test_the_python_api_adapts_a_loaded_model(base, tmp_path):
    import dis_core

    root, registry, new = base
    model = dis_core.load(root / "base", registry=registry, data_dir=root / "data", device="cpu")
    report = dis_core.adapt(model, root / "k_test_challenges.json", tmp_path / "m", steps=2, threads=1)
    assert report["base"]["checkpoint"] == str(model.checkpoint) and report["new_rows"] > 0
    assert sorted(json.loads((tmp_path / "m" / "submission.json").read_text())) == sorted(new)


def test_a_new_task_larger_than_the_models_canvas_is_named(tmp_path):
    from dis_plugins.tasks.arc.adapt_data import ArcAdaptConfig, ArcAdaptTask

    rng = np.random.default_rng(1)
    big = {"train": [{"input": _grid(rng, 2), "output": _grid(rng, 6)}], "test": [{"input": _grid(rng, 2), "output": _grid(rng, 2)}]}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big.json").write_text(json.dumps(big))
    assert ArcAdaptTask(ArcAdaptConfig(tasks=tmp_path / "t", first_id=3, canvas=6)).spec.seq_len == 36  # fits exactly
    with pytest.raises(UserError, match=r"task 'big'.*side 6.*5x5 canvas"):
        ArcAdaptTask(ArcAdaptConfig(tasks=tmp_path / "t", first_id=3, canvas=5))
