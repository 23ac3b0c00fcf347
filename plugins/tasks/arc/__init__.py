"""ARC-AGI (1 and 2, plus ConceptARC): the `arc` task and the `arc` evaluator.

Modules: sources (subsets, validation, leak check), encoding (tokens, dihedral transforms,
crop), canvas (smaller canvases, the subsets a task loads), augment (deduplicated variants, counter hashing), dataset (on-the-fly splits), task
(config and Task), reference_layout (TRM/HRM `.npy` directories, read and write), evaluator,
__main__ (`python -m dis_plugins.tasks.arc`: export to the TRM/HRM layout).
ConceptARC (MIT, see data/conceptarc/LICENSE) ships in data/conceptarc/.
"""

from __future__ import annotations

from dis_core import hookimpl

from .adapt_data import ArcAdaptConfig, build_arc_adapt_task
from .evaluator import ArcEvalConfig, build_arc_evaluator
from .reference_layout import export_reference_layout
from .task import ArcConfig, ArcTask, build_arc_task

__all__ = ["ArcConfig", "ArcTask", "ArcEvalConfig", "export_reference_layout"]


@hookimpl
def register_tasks(register):
    register("arc", ArcConfig, build_arc_task)
    register("arc_adapt", ArcAdaptConfig, build_arc_adapt_task)  # new tasks for `dis adapt`


@hookimpl
def register_evaluators(register):
    register("arc", ArcEvalConfig, build_arc_evaluator)
