"""`python -m dis_plugins.tasks.arc OUT_DIR [options]`: export ARC data in the TRM/HRM layout."""

from __future__ import annotations

import argparse
import sys

from .reference_layout import export_reference_layout
from .task import ArcConfig, ArcTask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dis_plugins.tasks.arc", description="Export ARC data in the TRM/HRM layout.")
    ap.add_argument("out_dir")
    ap.add_argument("--train-subsets", nargs="+", default=list(ArcConfig().train_subsets))
    ap.add_argument("--test-subset", default=ArcConfig().test_subset)
    ap.add_argument("--num-augmentations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-translate", action="store_true")
    ap.add_argument("--strict-split", action="store_true")
    ap.add_argument("--max-test-puzzles", type=int, default=None)
    a = ap.parse_args(argv)
    cfg = ArcConfig(train_subsets=tuple(a.train_subsets), test_subset=a.test_subset, num_augmentations=a.num_augmentations,
                    seed=a.seed, translate=not a.no_translate, strict_split=a.strict_split, max_test_puzzles=a.max_test_puzzles)
    counts = export_reference_layout(ArcTask(cfg), a.out_dir)
    print(f"wrote {a.out_dir}: {counts['train']} train and {counts['test']} test examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
