"""The `source,question,answer,rating` CSV layout that Sudoku-Extreme and Maze-Hard ship in
(one character per cell), read row by row with every problem named by file and line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import numpy as np

from dis_core.contract.errors import DataError
from dis_plugins.tasks.bank_cache import utf8_text


def csv_path(path, task: str, key: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"task {task}: {key} {p} is a directory, not a CSV file")
    if not p.is_file():
        raise DataError(f"task {task}: {key} file {p} not found")
    return p


def puzzle_rows(p: Path, cells: int, shape: str = "") -> Iterator[tuple[int, str, str, dict[str, str]]]:
    """(line, question, answer, the row by column name) for each row; the question and answer
    must be `cells` ASCII characters (`shape`, e.g. "9x9", only words the message)."""
    with p.open(newline="", encoding="utf-8") as f, utf8_text(p):
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if "question" not in header or "answer" not in header:
            raise DataError(f"{p}:1: header must name the columns source,question,answer,rating (got {header})")
        iq, ia = header.index("question"), header.index("answer")
        for row in reader:
            where = f"{p}:{reader.line_num}"
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            for name, text in (("question", row[iq]), ("answer", row[ia])):
                if len(text) != cells or not text.isascii():
                    raise DataError(f"{where}: {name} must be {cells} ASCII characters{f' ({shape})' if shape else ''}, got {len(text)}")
            yield reader.line_num, row[iq], row[ia], dict(zip(header, row))


def raise_first(p: Path, lines: list[int], problems: list[tuple[np.ndarray, str]]) -> None:
    """`problems`: (rows (K,) bool, what); a DataError naming the first bad row's line."""
    for bad, what in problems:
        if bad.any():
            raise DataError(f"{p}:{lines[int(np.argmax(bad))]}: {what}")
