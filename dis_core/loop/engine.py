"""The DeepSpeed engine around the supervision step. The config's rules live in
`dis_core.wiring.deepspeed_table`, the processes and devices in `dis_core.step.devices`; both are
re-exported here for the loop's use (`engine.deepspeed_config`, `engine.rank`, ...).
"""

from __future__ import annotations

import torch

from dis_core.step.devices import (  # noqa: F401  (re-exported)
    LAUNCHER_VARS, all_reduce_sum, barrier, gather_objects, init_distributed, launch_world_size, native_bf16,
    pick_device, rank, resolve_precision, world_size,
)
from dis_core.wiring.deepspeed_table import accumulation, deepspeed_config, deepspeed_problems  # noqa: F401


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
