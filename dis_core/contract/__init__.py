"""Layer 1, the contract: what plugins are written against and nothing else.

The Protocols of every component kind (`interfaces`), the slot table that declares the kinds
(`slots`) and their hooks (`hookspecs`), typed errors (`errors`), the contract's versions and
defaults (`compat`), config validators (`validators`), the boundary checks of plugin outputs
(`checks`), and the helpers plugins share (`reveal` paths, `metrics` tallies, `logs` progress).
Imports nothing else of dis_core (tests/test_layering.py).
"""
