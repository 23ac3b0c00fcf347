"""The package's own tests: the generator keeps dis's contract (dis_core.testing)."""

from dis_core.testing import check_target_generator, context, toy_task

from dis_row_sweep import RowSweepConfig, build_row_sweep


def test_row_sweep_keeps_the_generator_contract():
    task = toy_task()
    for direction in ("forward", "backward"):
        generator = build_row_sweep(RowSweepConfig(direction=direction), context(task))
        check_target_generator(generator, task, n_sup=4)
