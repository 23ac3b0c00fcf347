"""Builtin dis components, installed as `dis_plugins`. Each module is an ordinary plugin,
declared under the `dis` entry-point group in pyproject.toml."""
