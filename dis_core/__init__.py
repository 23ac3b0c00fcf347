"""dis: Deep Improvement Supervision for tiny recursive reasoning models.

`dis_core` is a small core in six layers, each a subpackage that imports only the ones before it
(docs/architecture.md): `contract` (what plugins are written against), `wiring` (plugins, the
registry, recipes, building), `step` (one supervision step, the Solver), `outputs` (the run
directory, run.json, trackers, pictures), `loop` (the trainer, checkpoints) and `tools` (the
command line, `dis_core.load`, compare, bench, check). `dis_core.testing` holds the plugin
author's conformance checks. Builtin components live in the `dis_plugins` package and are
discovered like any third-party plugin; this package never imports them.
"""

__version__ = "0.1.0"

from dis_core.contract.compat import CONTRACT_VERSION  # noqa: E402  (the plugin contract: docs/hooks.md, "Contract versions")
from dis_core.contract.errors import DisContractWarning  # noqa: E402
from dis_core.contract.hookspecs import hookimpl  # noqa: E402  (the one name plugin authors need)

__all__ = ["CONTRACT_VERSION", "DisContractWarning", "__version__", "adapt", "hookimpl", "load"]


def __getattr__(name: str):
    # `dis_core.load(run_dir_or_checkpoint)` -> a trained Model (dis_core/tools/inference.py). Imported
    # on first use, so `import dis_core` (every plugin does) stays free of torch.
    if name == "load":
        from dis_core.tools.inference import load

        return load
    if name == "adapt":  # `dis_core.adapt(model_or_run, tasks, out, ...)`: `dis adapt` from Python (docs/adapt.md)
        from dis_core.tools.adapt import adapt

        return adapt
    raise AttributeError(f"module 'dis_core' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Stable import paths. Modules moved into the layers stay importable under their old flat names
# (`dis_core.interfaces`, `dis_core.trainer`, ...), as the very same module objects, so plugins,
# scripts and pickles written against them keep working. Loaded on first import, never before.
import importlib.abc as _abc  # noqa: E402
import importlib.machinery as _machinery  # noqa: E402
import sys as _sys  # noqa: E402

MOVED = {
    **{m: "contract" for m in ("interfaces", "errors", "slots", "hookspecs", "compat", "validators", "checks",
                                 "reveal", "metrics", "logs")},
    **{m: "wiring" for m in ("config", "registry", "plugins", "recipe", "build")},
    **{m: "step" for m in ("solver", "supervision", "guidance", "losses", "puzzle_embedding", "accounting",
                             "diagnostics", "data")},
    **{m: "outputs" for m in ("rundir", "loggers", "runinfo", "trajectories", "selection")},
    **{m: "loop" for m in ("trainer", "training_state", "checkpoint", "guards", "ema", "schedule", "stopping",
                             "evaluation", "engine")},
    **{m: "tools" for m in ("inference", "inference_cli", "compare", "bench", "kit")},
}


class _MovedModules(_abc.MetaPathFinder, _abc.Loader):
    """`import dis_core.<old name>` gives the module `dis_core.<layer>.<old name>`."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.partition(".")
        if head == "dis_core" and name in MOVED:
            return _machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        import importlib

        return importlib.import_module(f"dis_core.{MOVED[spec.name.partition('.')[2]]}.{spec.name.partition('.')[2]}")

    def exec_module(self, module):
        pass  # the real module ran already


if not any(isinstance(f, _MovedModules) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModules())  # after the real finders: a real file always wins
