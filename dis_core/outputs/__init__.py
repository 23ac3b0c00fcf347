"""Layer 4, a run's outputs: the run directory (`rundir`), run.json (`runinfo`), experiment
trackers (`loggers`) and trajectory pictures (`trajectories`, with `selection` choosing and
judging the examples).
"""
