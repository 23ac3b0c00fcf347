"""Mazes: the token set, the seeded generator and the Maze-Hard CSV layout
(docs/reference.md#maze-hard-builder). The `maze` task and evaluator are in maze.py.

The generator carves a spanning-tree maze with a randomised depth-first walk (long winding
corridors) on the cells of one parity, knocks down `loop_fraction` of the remaining inner walls
so there are alternative routes, and places S and G at least `min_path_length` moves apart.
With `unique_path` only mazes whose shortest path is unique are kept; otherwise the label is a
canonical shortest path (lowest cell index first).
"""

from __future__ import annotations

import random
import time
from collections import deque

import numpy as np

from dis_core.contract.errors import DataError
from dis_core.contract.logs import progress
from dis_plugins.tasks.puzzle_csv import csv_path, puzzle_rows, raise_first

CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5  # token = position in CHARSET + 1


# ---- generation -----------------------------------------------------------------------------


def _neighbours(rows: int, cols: int) -> list[tuple[int, ...]]:
    out = []
    for r in range(rows):
        for c in range(cols):
            out.append(tuple(
                (r + dr) * cols + c + dc
                for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= r + dr < rows and 0 <= c + dc < cols
            ))
    return out


def _carve(rows: int, cols: int, rng: random.Random, loop_fraction: float) -> bytearray:
    """Open cells (1) of a spanning-tree maze plus loops. Cells sit on rows/cols of one parity;
    on even sides the parity is random so the all-wall border line moves from side to side."""
    r0 = rng.randrange(2) if rows % 2 == 0 else 0
    c0 = rng.randrange(2) if cols % 2 == 0 else 0
    h, w = (rows - r0 + 1) // 2, (cols - c0 + 1) // 2
    is_open, seen = bytearray(rows * cols), bytearray(h * w)

    def at(cell: int) -> int:
        return (r0 + 2 * (cell // w)) * cols + c0 + 2 * (cell % w)

    first = rng.randrange(h * w)
    seen[first], is_open[at(first)] = 1, 1
    stack = [first]
    while stack:
        cell = stack[-1]
        i, j = divmod(cell, w)
        options = [n for n, ok in ((cell - w, i > 0), (cell + w, i < h - 1), (cell - 1, j > 0), (cell + 1, j < w - 1))
                   if ok and not seen[n]]
        if not options:
            stack.pop()
            continue
        nxt = options[rng.randrange(len(options))]
        seen[nxt] = 1
        a, b = at(cell), at(nxt)
        is_open[(a + b) // 2] = is_open[b] = 1  # the wall between them, and the new cell
        stack.append(nxt)
    for cell in range(h * w):
        i, j = divmod(cell, w)
        for nxt, ok in ((cell + w, i < h - 1), (cell + 1, j < w - 1)):
            mid = (at(cell) + at(nxt)) // 2
            if ok and not is_open[mid] and rng.random() < loop_fraction:
                is_open[mid] = 1
    return is_open


def _bfs(is_open, neighbours, source: int) -> list[int]:
    dist = [-1] * len(is_open)
    dist[source] = 0
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in neighbours[u]:
            if is_open[v] and dist[v] < 0:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def make_maze(rows, cols, rng, neighbours, min_path_length, loop_fraction, unique_path):
    """-> (question tokens, label tokens, shortest path length in moves)."""
    while True:
        is_open = _carve(rows, cols, rng, loop_fraction)
        cells = [i for i, o in enumerate(is_open) if o]
        for _ in range(4):  # a few S/G draws per carved maze before carving another
            s = rng.choice(cells)
            from_s = _bfs(is_open, neighbours, s)
            far = [i for i in cells if from_s[i] >= max(min_path_length, 1)]
            if not far:
                continue
            g = rng.choice(far)
            from_g, length = _bfs(is_open, neighbours, g), from_s[g]
            if not unique_path or sum(1 for i in cells if from_s[i] + from_g[i] == length) == length + 1:
                break
        else:
            continue
        question = np.where(np.frombuffer(bytes(is_open), dtype=np.uint8) > 0, OPEN, WALL).astype(np.uint8)
        question[s], question[g] = START, GOAL
        label = question.copy()
        u = g
        for k in range(length - 1, 0, -1):  # walk back, lowest-index step first (canonical)
            u = min(v for v in neighbours[u] if from_s[v] == k)
            label[u] = PATH
        return question, label, length


def generate_bank(rows, cols, count, seed, min_path_length, loop_fraction, unique_path, exclude):
    rng, neighbours = random.Random(seed), _neighbours(rows, cols)
    questions, labels, lengths, seen = [], [], [], set(exclude)
    started = time.time()
    bar = progress(count, f"mazes {rows}x{cols}", unit="maze")
    while len(questions) < count:
        q, a, n = make_maze(rows, cols, rng, neighbours, min_path_length, loop_fraction, unique_path)
        if bytes(q) not in seen:
            seen.add(bytes(q))
            questions.append(q)
            labels.append(a)
            lengths.append(n)
            bar.update(1)
    bar.close()
    rate = count / max(time.time() - started, 1e-9)
    bank = {"question": np.array(questions, dtype=np.uint8).reshape(count, rows * cols),
            "label": np.array(labels, dtype=np.uint8).reshape(count, rows * cols),
            "length": np.array(lengths, dtype=np.int32)}
    return bank, rate


# ---- the Maze-Hard CSV layout ---------------------------------------------------------------

_TOKEN = np.zeros(256, dtype=np.uint8)  # char code -> token, 0 = not in the charset
for _i, _ch in enumerate(CHARSET):
    _TOKEN[ord(_ch)] = _i + 1


def read_csv(path: str, rows: int, cols: int, key: str) -> dict:
    """`source,question,answer,rating` rows of rows*cols characters over "# SGo"."""
    p = csv_path(path, "maze", key)
    L, questions, answers, lines = rows * cols, [], [], []
    for line, question, answer, _ in puzzle_rows(p, L, f"{rows}x{cols}"):
        questions.append(question)
        answers.append(answer)
        lines.append(line)
    if not questions:
        raise DataError(f"task maze: {p} has no rows")
    q = _TOKEN[np.frombuffer("".join(questions).encode(), dtype=np.uint8)].reshape(-1, L)
    a = _TOKEN[np.frombuffer("".join(answers).encode(), dtype=np.uint8)].reshape(-1, L)
    ends = (q == START) | (q == GOAL)
    a = np.where(ends, q, a)  # S and G stay themselves in labels, whether or not the file marks them 'o'
    problems = [
        (((q == 0) | (q == PATH)).any(1), "question has a character outside '# SG'"),
        (((q == START).sum(1) != 1) | ((q == GOAL).sum(1) != 1), "question needs exactly one S and one G"),
        ((a == 0).any(1), "answer has a character outside '# SGo'"),
        (((a != q) & ~((q == OPEN) & (a == PATH))).any(1), "answer changes a cell other than marking open cells 'o'"),
    ]
    raise_first(p, lines, problems)
    return {"question": q, "label": a, "length": (a == PATH).sum(1).astype(np.int32) + 1}
