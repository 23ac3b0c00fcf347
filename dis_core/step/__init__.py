"""Layer 3, the step: what one supervision step means, and the model every path uses.

`solver` (backbone, puzzle table, step rule, halting, device, precision, built once) ;
`supervision` (targets, inputs, loss, the carry, the rollout) with `guidance` (the paper's
guidance and Advantage Margin) and `losses`; the puzzle table (`puzzle_embedding`), the data
stream and batches (`data`), devices and processes (`devices`), the cost of a step
(`accounting`) and target-path diagnostics (`diagnostics`).
"""
