"""Layer 5, the training loop: when things happen (`trainer`), what a checkpoint holds
(`training_state`, `checkpoint`), the DeepSpeed engine (`engine`), evaluation (`evaluation`),
non-finite guards, EMA, the learning-rate schedule and stopping on a signal.
"""
