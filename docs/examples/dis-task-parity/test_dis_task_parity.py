"""The package's own tests: the task and the evaluator keep dis's contracts (dis_core.testing)."""

from dis_core.testing import check_evaluator, check_task, context, toy_task

from dis_task_parity import ParityConfig, ParityEvalConfig, build_parity, build_parity_evaluator


def small_parity():
    return build_parity(ParityConfig(length=6, num_train=40, num_test=16), context())


def test_parity_task_keeps_the_task_contract():
    # Given a factory, check_task builds twice: the two builds must agree. It also checks
    # solver_trajectory, the optional capability `solver_edits` uses.
    check_task(small_parity)


def test_parity_evaluator_keeps_the_evaluator_contract():
    task = small_parity()
    evaluator = build_parity_evaluator(ParityEvalConfig(), context(task))
    check_evaluator(evaluator, task, perfect=["parity_accuracy", "sequence_accuracy"])


def test_parity_evaluator_refuses_another_task():
    import pytest

    from dis_core.errors import CapabilityError

    with pytest.raises(CapabilityError):
        build_parity_evaluator(ParityEvalConfig(), context(toy_task()))
