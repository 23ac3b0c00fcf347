"""ARC data preparation: time, memory and disk, against the reference's materialised build.

    python benchmarks/bench_arc_prepare.py                     # ARC-1 (training+evaluation) + ConceptARC, 1000 variants
    python benchmarks/bench_arc_prepare.py --arc2              # ARC-2 (training2+evaluation2) + ConceptARC
    python benchmarks/bench_arc_prepare.py --export /tmp/ref   # also write the reference layout and time it

The reference builder (TRM `build_arc_dataset.py`) was measured at 18 min 39 s, 15.5 GB peak
memory and 7.3 GB on disk for ARC-1 + ConceptARC at 1000 augmentations (876,406 identifiers).
Here nothing is written: variants are a small table and every example is rendered on demand.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arc2", action="store_true")
    ap.add_argument("--num-augmentations", type=int, default=1000)
    ap.add_argument("--export", type=Path, default=None)
    a = ap.parse_args()

    from dis_plugins.tasks.arc import ArcConfig, ArcTask, export_reference_layout
    from dis_plugins.tasks.arc.sources import CONCEPTARC_DIR, _read_json

    rss_imports = _rss_mb()
    train_subsets = ("arc2/training", "conceptarc") if a.arc2 else ("arc1/training", "conceptarc")
    test_subset = "arc2/evaluation" if a.arc2 else "arc1/evaluation"
    config = ArcConfig(train_subsets=train_subsets, test_subset=test_subset, num_augmentations=a.num_augmentations)

    start = time.perf_counter()
    task = ArcTask(config)
    train, test = task.dataset("train"), task.dataset("test")
    train.get(np.arange(512))
    prep = time.perf_counter() - start
    rss_after = _rss_mb()

    _read_json.cache_clear()  # a second, traced build measures the allocations (tracing slows it down)
    tracemalloc.start()
    again = ArcTask(config)
    again.dataset("train").get(np.arange(512))
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del again

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(20):
        train.get(rng.integers(0, len(train), 512))
    per_batch = (time.perf_counter() - start) / 20

    corpus = task.corpus
    n_train_ex = int((corpus.n_var[train.group_puzzle] * train.group_size).sum())  # what the reference materialises
    n_test_ex = len(test)
    n_puzzles = int(corpus.n_var[train.group_puzzle].sum() + test.n_var.sum())
    ref_bytes = (n_train_ex + n_test_ex) * 900 * 2 + (n_puzzles * 2 + len(train.group_puzzle) + len(test.group_puzzle)) * 4
    held = corpus.grids.nbytes + corpus.shapes.nbytes + corpus.var_tid.nbytes + corpus.var_map.nbytes
    print(f"subsets                 {' + '.join(train_subsets)} | test {test_subset}, {a.num_augmentations} variants")
    print(f"preparation time        {prep:.2f} s  (reference: 18 min 39 s for ARC-1)")
    print(f"memory                  peak RSS {rss_after:.0f} MB (after imports {rss_imports:.0f} MB); "
          f"numpy/python peak during preparation {traced_peak / 2**20:.0f} MB; held arrays {held / 2**20:.1f} MB")
    print(f"disk written            0 bytes (shipped ConceptARC: {_du(CONCEPTARC_DIR.parent) / 2**20:.1f} MB)")
    print(f"puzzle identifiers      {task.spec.num_puzzle_ids:,} (blank included; reference ARC-1: 876,406)")
    print(f"train split             {len(train):,} indices = {train.rounds} rounds x {int(train.example_offset[-1]):,} examples; "
          f"materialised it would be {n_train_ex:,} examples")
    print(f"test split              {n_test_ex:,} examples ({len(task.test_puzzles)} tasks, every variant of every test pair)")
    print(f"batch of 512 (train)    {per_batch * 1000:.1f} ms to render")
    print(f"reference layout size   {ref_bytes / 1e9:.2f} GB (inputs + labels uint8 x 900 + index arrays, without identifiers.json)")
    print(f"puzzle table (fp32)     {task.spec.num_puzzle_ids * 256 * 4 / 2**20:.0f} MiB at 256 dims, "
          f"{task.spec.num_puzzle_ids * 512 * 4 / 2**20:.0f} MiB at 512 dims")
    if a.export is not None:
        start = time.perf_counter()
        counts = export_reference_layout(task, a.export)
        print(f"export                  {time.perf_counter() - start:.1f} s, {_du(a.export) / 1e9:.2f} GB, {counts}, peak RSS {_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
