"""dis: Deep Improvement Supervision for tiny recursive reasoning models.

`dis_core` holds the interfaces, the plugin registry, recipe loading and the trainer.
Builtin components live in the `dis_plugins` package and are discovered like any
third-party plugin; this package never imports them.
"""

__version__ = "0.1.0"

from dis_core.compat import CONTRACT_VERSION  # noqa: E402  (the plugin contract: docs/hooks.md, "Contract versions")
from dis_core.errors import DisContractWarning  # noqa: E402
from dis_core.hookspecs import hookimpl  # noqa: E402  (the one name plugin authors need)

__all__ = ["CONTRACT_VERSION", "DisContractWarning", "__version__", "hookimpl", "load"]


def __getattr__(name: str):
    # `dis_core.load(run_dir_or_checkpoint)` -> a trained Model (dis_core/inference.py). Imported
    # on first use, so `import dis_core` (every plugin does) stays free of torch.
    if name == "load":
        from dis_core.inference import load

        return load
    raise AttributeError(f"module 'dis_core' has no attribute {name!r}")
