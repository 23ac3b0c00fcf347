"""`train.precision = "auto"`: bf16 where the device computes bf16 natively (a CPU with AVX512-BF16
or AMX, read from its flags), fp32 elsewhere; run.json records the choice and a trained model is
evaluated in the precision it trained in, whatever the machine that evaluates it; the fidelity
checks ask for fp32 themselves."""

from __future__ import annotations

import json
import re

import pytest
import torch

import dis_core
from dis_core.step import devices
from dis_core.step.devices import native_bf16, resolve_precision
from dis_core.tools.cli import main

from conftest import ROOT, tiny_recipe

CPU = torch.device("cpu")
ZEN4 = frozenset({"avx512f", "avx512_bf16"})  # this project's machine
SAPPHIRE_RAPIDS = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
SKYLAKE = frozenset({"avx2", "avx512f", "avx512bw"})  # AVX512 without bf16: torch's capability string is the same


@pytest.mark.parametrize("flags, chosen", [(ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (SKYLAKE, "fp32"), (frozenset(), "fp32")],
                         ids=["avx512_bf16", "amx", "avx512-only", "no-flags"])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch, flags, chosen):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    assert resolve_precision("auto", CPU) == chosen
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"  # asked: kept


def test_this_machines_flags_are_read_not_assumed():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    assert native_bf16(CPU) == bool({"avx512_bf16", "amx_bf16"} & flags)


def _run(tmp_path, name: str, *sets: str):
    out = tmp_path / name
    args = ["run", str(tiny_recipe(tmp_path, steps=2)), "--out", str(out), "--data-dir", str(tmp_path / "data")]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
    return out


def test_run_json_records_the_choice_and_eval_reuses_it_on_another_machine(tmp_path, monkeypatch):
    # Trained where auto means fp32 (no native bf16), evaluated where it would mean bf16: fp32.
    monkeypatch.setattr(devices, "_cpu_flags", lambda: SKYLAKE)
    fp32_run = _run(tmp_path, "fp32_run")
    assert json.loads((fp32_run / "run.json").read_text())["precision"] == "fp32"
    monkeypatch.setattr(devices, "_cpu_flags", lambda: ZEN4)
    bf16_run = _run(tmp_path, "bf16_run")
    assert json.loads((bf16_run / "run.json").read_text())["precision"] == "bf16"
    assert dis_core.load(fp32_run, data_dir=tmp_path / "data").solver.precision == "fp32"
    # ... and the other way round.
    monkeypatch.setattr(devices, "_cpu_flags", lambda: SKYLAKE)
    assert dis_core.load(bf16_run, data_dir=tmp_path / "data").solver.precision == "bf16"
    # An explicit --set still wins.
    assert dis_core.load(bf16_run, data_dir=tmp_path / "data", set_overrides=['train.precision="fp32"']).solver.precision == "fp32"


def test_dis_eval_gives_the_runs_final_metrics_in_its_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: ZEN4)
    run = _run(tmp_path, "run")
    final = json.loads((run / "summary.json").read_text())
    monkeypatch.setattr(devices, "_cpu_flags", lambda: SKYLAKE)  # the evaluating machine would choose fp32
    assert main(["eval", str(run), "--out", str(tmp_path / "ev"), "--data-dir", str(tmp_path / "data")]) == 0
    record = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert record["precision"] == "bf16"
    again = record["metrics"]
    assert again["exact/accuracy"] == final["exact/accuracy"] and again["nqueens/valid_solution_rate"] == final["nqueens/valid_solution_rate"]


def test_the_fidelity_checks_pin_fp32():
    # The golden traces replay the official fp32 code bit for bit; auto would pick bf16 here.
    assert 'precision = "fp32"' in (ROOT / "tests" / "test_golden.py").read_text()
    for bench in ("bench_vs_official.py", "bench_memory.py"):  # their recipes always say which precision
        assert re.search(r'^precision = "\{precision\}"$', (ROOT / "benchmarks" / bench).read_text(), re.M)
