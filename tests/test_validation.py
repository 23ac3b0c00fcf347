"""Values that used to pass `dis-run --dry-run` and then crash the run (issue #17) are refused when
the recipe is loaded: exit status 2, a message naming the recipe file and the key, every problem
at once. Validation only: nothing here trains."""

from __future__ import annotations

import json
import math
import sys

import attrs
import pytest

from dis_core.loop import engine
from dis_core.wiring import deepspeed_table
from dis_core.tools.cli import main
from dis_core.contract.errors import RecipeError, UserError
from dis_core.wiring.recipe import MAX_EXTENDS, load_raw, load_recipe
from dis_core.contract.validators import finite, in_range, non_negative, positive, probability

from conftest import tiny_recipe


def _dry_run(capsys, path, *overrides: str, data_dir=None) -> tuple[int, str]:
    args = ["run", str(path), "--dry-run", *(a for o in overrides for a in ("--set", o))]
    code = main([*args, "--data-dir", str(data_dir)] if data_dir else args)
    return code, capsys.readouterr().err


# (overrides, the key path the message must name, words the message must hold)
REFUSED = [
    # 1. optimizers: torch refuses some of these only when the trainer builds the optimizer, and
    # lets lr = inf through to a run of NaN weights.
    (["train.optimizer.config.betas=[1.5, 0.9]"], "$.train.optimizer.config.betas", "betas must each lie in [0, 1)"),
    (["train.optimizer.config.betas=[0.9, 1.0]"], "$.train.optimizer.config.betas", "betas must each lie in [0, 1)"),
    (["train.optimizer.config.lr=-1e-3"], "$.train.optimizer.config.lr", "lr must be >= 0"),
    (["train.optimizer.config.lr=nan"], "$.train.optimizer.config.lr", "lr must be a finite number, got nan"),
    (["train.optimizer.config.lr=inf"], "$.train.optimizer.config.lr", "lr must be a finite number, got inf"),
    (["train.optimizer.config.eps=0.0"], "$.train.optimizer.config.eps", "eps must be > 0"),
    (["train.optimizer.config.eps=nan"], "$.train.optimizer.config.eps", "finite"),
    (["train.optimizer.config.weight_decay=-0.1"], "$.train.optimizer.config.weight_decay", "must be >= 0"),
    (["train.optimizer.config.weight_decay=nan"], "$.train.optimizer.config.weight_decay", "finite"),
    (["train.optimizer.name=adam_atan2", "train.optimizer.config.lr=nan"], "$.train.optimizer.config.lr", "finite"),
    (["train.optimizer.name=adam_atan2", "train.optimizer.config.weight_decay=inf"], "$.train.optimizer.config.weight_decay", "finite"),
    (["train.optimizer.name=adam_atan2", "train.optimizer.config.betas=[nan, 0.9]"], "$.train.optimizer.config.betas", "[0, 1)"),
    # the backbone's own numbers: an infinite expansion overflowed the SwiGLU width at --dry-run
    (["backbone.config.expansion=inf"], "$.backbone.config.expansion", "finite"),
    (["backbone.config.rope_theta=nan"], "$.backbone.config.rope_theta", "finite"),
    # 2. the recipe's own numbers
    (["train.ema=2.0"], "$.train.ema", "ema must lie in [0, 1), got 2.0"),
    (["train.ema=1.0"], "$.train.ema", "[0, 1)"),  # a decay of 1 never moves the averaged weights
    (["train.ema=nan"], "$.train.ema", "[0, 1)"),
    (["train.epochs=inf"], "$.train.epochs", "epochs must be a finite number, got inf"),
    (["train.epochs=nan"], "$.train.epochs", "finite"),
    (["train.epochs=-1.0"], "$.train.epochs", "epochs must be > 0"),
    (["train.puzzle_emb_lr=nan"], "$.train.puzzle_emb_lr", "finite"),
    (["train.puzzle_emb_lr=-0.01"], "$.train.puzzle_emb_lr", ">= 0"),
    (["train.puzzle_emb_weight_decay=-1.0"], "$.train.puzzle_emb_weight_decay", ">= 0"),
    (["train.grad_clip=-1.0"], "$.train.grad_clip", ">= 0"),
    (["train.grad_clip=inf"], "$.train.grad_clip", "finite"),
    (["train.schedule.warmup_steps=-5"], "$.train.schedule.warmup_steps", ">= 0"),
    (["train.schedule.min_lr_ratio=1.5"], "$.train.schedule.min_lr_ratio", "[0, 1]"),
    (["train.schedule.min_lr_ratio=nan"], "$.train.schedule.min_lr_ratio", "[0, 1]"),
    (["train.seed=-1"], "$.train.seed", "seed must lie in [0, 4294967295], got -1"),  # numpy refuses negative seeds
    (["train.micro_batch_size=3"], "$.train.micro_batch_size", "does not divide the 8 slots"),
    # 6. a NaN guidance scale would be written bare into summary.json
    (["eval.guidance=[nan]"], "$.eval.guidance", "guidance must each be a finite number"),
    (["eval.guidance=[0.5, inf]"], "$.eval.guidance", "finite"),
    # 3. [deepspeed]: what a run refuses, and what DeepSpeed refuses with a pydantic traceback
    (['deepspeed.zero_optimization.stage="banana"'], "$.deepspeed.zero_optimization.stage", "expected one of 0, 1, 2, got 'banana'"),
    (["deepspeed.zero_optimization.stage=9"], "$.deepspeed.zero_optimization.stage", "expected one of 0, 1, 2, got 9"),
    (["deepspeed.zero_optimization.stage=true"], "$.deepspeed.zero_optimization.stage", "expected one of 0, 1, 2"),
    (["deepspeed.zero_optimization.stage=3"], "$.deepspeed.zero_optimization.stage", "ZeRO stage 3 is not supported"),
    (["deepspeed.zero_optimization=true"], "$.deepspeed.zero_optimization", "expected a table"),
    (["deepspeed.train_batch_size=16"], "$.deepspeed.train_batch_size", "set the batch in [train] only"),
    (["deepspeed.train_micro_batch_size_per_gpu=4"], "$.deepspeed.train_micro_batch_size_per_gpu", "set the batch in [train] only"),
    (["deepspeed.gradient_accumulation_steps=2"], "$.deepspeed.gradient_accumulation_steps", "set the batch in [train] only"),
    (['deepspeed.optimizer={ type = "Adam" }'], "$.deepspeed.optimizer", "use [train.optimizer] and [train.schedule]"),
    (['deepspeed.scheduler={ type = "WarmupLR" }'], "$.deepspeed.scheduler", "use [train.optimizer] and [train.schedule]"),
    (['deepspeed.gradient_clipping="x"'], "$.deepspeed.gradient_clipping", "expected a number"),
    (['deepspeed.bf16.enabled="yes"'], "$.deepspeed.bf16.enabled", "expected a boolean"),
    (['deepspeed.zero_optimization.reduce_bucket_size="x"'], "$.deepspeed.zero_optimization.reduce_bucket_size", "DeepSpeed"),
    (["deepspeed.zero_optimization.bogus=1"], "$.deepspeed.zero_optimization.bogus", "unknown key"),
    (["deepspeed.comms_logger={ enabled = 3 }"], "$.deepspeed.comms_logger.enabled", "DeepSpeed"),
    (["deepspeed.fp16.enabled=true", "deepspeed.bf16.enabled=true"], "$.deepspeed", "bfloat16 and fp16"),
]


@pytest.mark.parametrize("overrides, at, words", REFUSED, ids=[" ".join(c[0]) for c in REFUSED])
def test_dry_run_refuses_what_the_run_would_crash_on(tmp_path, capsys, overrides, at, words):
    path = tiny_recipe(tmp_path)
    code, err = _dry_run(capsys, path, *overrides)
    assert code == 2 and "Traceback" not in err
    assert str(path) in err
    line = next((ln for ln in err.splitlines() if ln.endswith(f"@ {at}")), None)
    assert line is not None, err  # the key itself, not its table
    assert words in line


def test_every_problem_is_reported_at_once(tmp_path, registry):
    path = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry, ["train.optimizer.config.betas=[1.5, 0.9]", "train.optimizer.config.lr=nan",
                                     "train.ema=2.0", "train.grad_clip=-1.0", "eval.guidance=[nan]",
                                     "deepspeed.zero_optimization.stage=3", "deepspeed.train_batch_size=16"])
    # Two fields of one class each (attrs alone stops at the first), and every table.
    assert sorted(p.rpartition(" @ ")[2] for p in info.value.problems) == [
        "$.deepspeed.train_batch_size", "$.deepspeed.zero_optimization.stage", "$.eval.guidance",
        "$.train.ema", "$.train.grad_clip", "$.train.optimizer.config.betas", "$.train.optimizer.config.lr",
    ]


@pytest.mark.parametrize("overrides", [
    ["train.ema=0.999", "train.epochs=0.5", "train.grad_clip=1.0", "eval.guidance=[0.0, -0.5, 1.5]",
     "train.optimizer.config.betas=[0.0, 0.999]", "train.optimizer.config.lr=0.0", "train.schedule.min_lr_ratio=0.0"],
    ["deepspeed.zero_optimization.stage=1"],
    ["deepspeed.zero_optimization={ stage = 2, reduce_bucket_size = 1000 }", "deepspeed.comms_logger={ enabled = false }"],
    ["deepspeed.train_batch_size=8", "deepspeed.gradient_accumulation_steps=1"],  # what dis computes: a run accepts it
    ["train.micro_batch_size=2"],
])
def test_sound_values_still_load(tmp_path, registry, overrides):
    resolved = load_recipe(tiny_recipe(tmp_path), registry, overrides)
    assert resolved.recipe.train.global_batch_size == 8


def test_the_run_refuses_the_deepspeed_table_with_the_same_words():
    """`engine.deepspeed_config` (what a run calls) and recipe validation share their rules, so a
    recipe built in Python without the loader meets the same message."""
    for user, key in [({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
                      ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
                      ({"optimizer": {"type": "Adam"}}, "optimizer")]:
        [problem] = engine.deepspeed_problems(user, global_batch=8, micro_batch=None, grad_clip=0.0, world=1)
        message, _, at = problem.rpartition(" @ ")
        assert at == f"$.deepspeed.{key}"
        with pytest.raises(UserError) as info:
            engine.deepspeed_config(user, global_batch=8, world=1, grad_clip=0.0)
        assert str(info.value) == message


def test_batch_split_is_checked_for_the_launchers_process_count(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # set by deepspeed / torchrun before dis starts
    # as when a recipe is loaded: before this process starts its process group (an earlier test
    # in this session may have started a one-process group)
    monkeypatch.setattr(deepspeed_table.dist, "is_initialized", lambda: False)
    [problem] = engine.deepspeed_problems({}, global_batch=8, micro_batch=None, grad_clip=0.0)
    assert problem.endswith("@ $.train.global_batch_size") and "not divisible by the 3 processes" in problem


# ------------------------------------------------------------------ 4. plan files


def _plan_recipe(tmp_path, text: str):
    plans = tmp_path / "plans.jsonl"
    plans.write_text(text)
    path = tiny_recipe(tmp_path, targets="plan_import")
    path.write_text(path.read_text().replace('name = "plan_import"', 'name = "plan_import"\nconfig = { path = "plans.jsonl" }'))
    return path, plans


def test_plan_with_a_huge_example_id_names_the_file_and_line(tmp_path, capsys):
    unset = [None] * 25  # a 5x5 board, every cell unset: parses, so the id is what is checked
    lines = [json.dumps({"example_id": 1, "steps": [unset]}), json.dumps({"example_id": 10**30, "steps": [unset]})]
    path, plans = _plan_recipe(tmp_path, "\n".join(lines) + "\n")
    code, err = _dry_run(capsys, path, data_dir=tmp_path / "data")
    assert code == 2 and "Traceback" not in err and "OverflowError" not in err
    assert f"{plans}:2: example_id {10**30} is outside the train split" in err


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_plan_file_is_an_error(tmp_path, capsys, text):
    path, plans = _plan_recipe(tmp_path, text)
    code, err = _dry_run(capsys, path, data_dir=tmp_path / "data")
    assert code == 2 and "Traceback" not in err
    assert f"{plans}: the plan file holds no plans" in err


def test_a_plan_file_for_the_other_split_only_is_not_empty(tmp_path, capsys):
    # Every training example then takes the fallback, as documented; only a file without lines is refused.
    path, _ = _plan_recipe(tmp_path, json.dumps({"example_id": 0, "split": "test", "steps": [[1]]}) + "\n")
    code, err = _dry_run(capsys, path, data_dir=tmp_path / "data")
    assert code == 0, err


# ------------------------------------------------------------------ 5. extends


def _chain(tmp_path, n: int):
    """r0.toml extends r1.toml ... extends r{n-1}.toml, which is a whole recipe: n recipes."""
    tiny_recipe(tmp_path, name=f"r{n - 1}.toml")
    for i in range(n - 1):
        (tmp_path / f"r{i}.toml").write_text(f'extends = "r{i + 1}.toml"\n')
    return tmp_path / "r0.toml"


def test_a_long_extends_chain_is_refused_not_a_recursion_error(tmp_path):
    root = _chain(tmp_path, 1000)
    with pytest.raises(RecipeError) as info:
        load_raw(root)
    msg = str(info.value)
    assert str(root) in msg and f"longer than {MAX_EXTENDS} recipes" in msg
    chain = msg.split("recipes: ", 1)[1]  # the chain, from the recipe given
    assert chain.startswith(str(tmp_path / "r0.toml") + " -> " + str(tmp_path / "r1.toml"))
    assert f"r{MAX_EXTENDS}.toml -> ..." in chain


def test_an_extends_chain_at_the_limit_loads(tmp_path, registry):
    assert load_recipe(_chain(tmp_path, MAX_EXTENDS), registry).recipe.train.steps == 6


def test_an_extends_cycle_names_the_chain(tmp_path):
    for a, b in [("a", "b"), ("b", "c"), ("c", "a")]:
        (tmp_path / f"{a}.toml").write_text(f'extends = "{b}.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_raw(tmp_path / "a.toml")
    names = [str(tmp_path / f"{n}.toml") for n in "abca"]
    assert "extends forms a cycle: " + " -> ".join(names) in str(info.value)


# ------------------------------------------------------------------ 7. dis bench


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-3"], "--steps must be at least 1, got -3"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--eval", "-2"], "--eval must be >= 0"),
])
def test_bench_refuses_counts_that_time_nothing(tmp_path, capsys, flags, words):
    code = main(["bench", str(tiny_recipe(tmp_path)), *flags, "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and words in err


# ------------------------------------------------------------------ 8. --plugin whose hook raises


RAISING_PLUGIN = '''
from dis_core import hookimpl


@hookimpl
def register_target_generators(register):
    raise RuntimeError("the planner service is down")
'''


def test_a_plugin_flag_whose_hook_raises_is_a_named_plugin_error(tmp_path, capsys):
    plugin = tmp_path / "raising_hook_plugin.py"
    plugin.write_text(RAISING_PLUGIN)
    try:
        code = main(["run", str(tiny_recipe(tmp_path)), "--dry-run", "--plugin", str(plugin)])
    finally:
        sys.modules.pop("raising_hook_plugin", None)  # loaded by file path under its stem
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"--plugin {plugin}: its hook register_target_generators ({plugin}) raised RuntimeError: the planner service is down" in err


# ------------------------------------------------------------------ the validators


@attrs.frozen(kw_only=True)
class _Numbers:
    pos: float = attrs.field(default=1.0, validator=positive)
    nonneg: float = attrs.field(default=0.0, validator=non_negative)
    prob: float = attrs.field(default=0.5, validator=probability)
    ranged: tuple[float, ...] = attrs.field(default=(0.5,), validator=in_range(0.0, 1.0, high_open=True))
    real: tuple[float, ...] = attrs.field(default=(), validator=finite)
    maybe: float | None = attrs.field(default=None, validator=positive)


@pytest.mark.parametrize("field", ["pos", "nonneg", "prob", "ranged", "real"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_numeric_validators_refuse_nan_and_infinities(field, bad):
    value = (bad,) if field in ("ranged", "real") else bad
    with pytest.raises(ValueError, match=field):
        _Numbers(**{field: value})


def test_numeric_validators_keep_sound_values():
    assert _Numbers(pos=3, nonneg=0, prob=1.0, ranged=(0.0, 0.99), real=(-2.5, 0.0), maybe=None).pos == 3
