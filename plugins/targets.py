"""Target generators: the per-step targets y_1^+ .. y_N^+ that DIS supervises.

- `reveal_path` (default, the official DIS code): an x -> y* path that reveals the cells where
  the input differs from the label in a random order, floor(s * n_diff / N) of them at frame s.
- `mask`, `random_replace` (the paper's wording): y* corrupted at a linearly decreasing rate
  beta_s, with a mask token or with random tokens.
- `final` (TRM): y* at every step.

Every generator returns (B, N, L) int64 with frame N-1 (0-based) == labels, draws randomness only
from the generator it is handed, and keeps IGNORE wherever a cell is not supervised. Step weights
and what the model is fed at each step are the trainer's business, not the generator's.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import attrs
import torch

from dis_core import hookimpl
from dis_core.contract.interfaces import IGNORE
from dis_core.contract.reveal import reveal_frames
from dis_core.contract.validators import one_of


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


# ----------------------------------------------------------------------------- reveal_path


@attrs.frozen(kw_only=True)
class RevealPathConfig:
    """No options: this is the official DIS path (`batch_corrupt_linear_path_v2`)."""


class RevealPath:
    """x -> y* over the differing cells, in a random order per example.

    A cell whose label is IGNORE (output padding) counts as differing from its input. While
    unrevealed its target is the input token and it is supervised; once revealed its target is
    IGNORE and it leaves the loss. This is what the reference does (docs/reference.md#dis-targets).
    """

    monotone = True

    def __call__(self, batch, n_sup, generator):
        x0, x1 = batch["inputs"], batch["labels"]  # (B, L) each
        diff = x0 != x1  # IGNORE labels never equal a token, so padding differs
        scores = _uniform(tuple(x0.shape), generator, x0.device)
        scores = torch.where(diff, scores, torch.full_like(scores, math.inf))
        order = scores.argsort(dim=-1)  # (B, L) the differing cells first, in a random order
        return reveal_frames(x0, x1, order, diff.sum(-1), n_sup).long()


def build_reveal_path(config: RevealPathConfig, ctx) -> RevealPath:
    """Official DIS path: reveal the cells where x differs from y*, floor(s*n_diff/N) at step s."""
    return RevealPath()


# ----------------------------------------------------------------------------- corruption


def _rates(schedule: str, n_sup: int) -> list[float]:
    """beta_1 .. beta_N, strictly decreasing, beta_N = 0 so that frame N is y* exactly."""
    if schedule == "linear":
        rates = [1.0 - s / n_sup for s in range(1, n_sup + 1)]
    else:  # cosine: keeps more corruption in the early frames than linear does
        rates = [math.cos(0.5 * math.pi * s / n_sup) for s in range(1, n_sup + 1)]
    rates[-1] = 0.0  # cos(pi/2) is 6e-17, not 0
    return rates


def _corrupted(batch, n_sup, generator, schedule, keep_clues) -> torch.Tensor:
    """(B, N, L) bool: cells corrupted at frame s. One noise value per cell compared with the
    decreasing beta_s gives nested sets, so a cell once restored stays restored."""
    x, y = batch["inputs"], batch["labels"]
    eligible = y != IGNORE  # an unsupervised cell stays IGNORE in every frame
    if keep_clues:
        eligible &= x != y  # cells the input already gives right are never corrupted
    u = _uniform(tuple(y.shape), generator, y.device)  # (B, L)
    beta = torch.tensor(_rates(schedule, n_sup), device=y.device, dtype=u.dtype)  # (N,)
    return (u[:, None, :] < beta[None, :, None]) & eligible[:, None, :]


def _check_token(token: int, what: str, ctx) -> None:
    if not 0 <= token < ctx.spec.vocab_size:
        # the loss skips targets outside [0, V): such a token would silently unsupervise cells
        ctx.fail(f"{what} {token} is outside the vocabulary [0, {ctx.spec.vocab_size})", at=f"config.{what}")


Schedule = Literal["linear", "cosine"]


@attrs.frozen(kw_only=True)
class MaskConfig:
    # beta_s: "linear" = 1 - s/N (the paper's "linearly decreasing mask rate"), or "cosine".
    schedule: Schedule = attrs.field(default="linear", validator=one_of(*get_args(Schedule)))
    # None = the task's pad_id. The vocabulary has no spare id, and PAD is never the label of a
    # supervised cell (padding labels are IGNORE), so it reads as "unknown" without growing V.
    # (maxwell-gao/VirtualRecursiveNetwork adds a token V-1 instead.)
    mask_token: int | None = None
    # Never corrupt cells where input == label (the clues), as VirtualRecursiveNetwork does.
    keep_clues: bool = False


class MaskTargets:
    """y* with each supervised cell replaced by `mask_token` at rate beta_s."""

    monotone = True

    def __init__(self, mask_token: int, schedule: str = "linear", keep_clues: bool = False):
        self.mask_token, self.schedule, self.keep_clues = mask_token, schedule, keep_clues

    def __call__(self, batch, n_sup, generator):
        y = batch["labels"]
        corrupt = _corrupted(batch, n_sup, generator, self.schedule, self.keep_clues)  # (B, N, L)
        return torch.where(corrupt, torch.full_like(corrupt, self.mask_token, dtype=torch.long), y[:, None, :].long())


def build_mask(config: MaskConfig, ctx) -> MaskTargets:
    """Paper variant: y* masked at a linearly decreasing rate (mask token defaults to PAD)."""
    token = ctx.spec.pad_id if config.mask_token is None else config.mask_token
    _check_token(token, "mask_token", ctx)
    return MaskTargets(token, config.schedule, config.keep_clues)


@attrs.frozen(kw_only=True)
class RandomReplaceConfig:
    schedule: Schedule = attrs.field(default="linear", validator=one_of(*get_args(Schedule)))
    # Replacement tokens are uniform over [low, high], inclusive. Defaults: pad_id + 1 .. V - 1,
    # i.e. every token but PAD for the builtin tasks (PAD is 0): N-Queens {empty, queen}, ARC
    # EOS + colours. A draw may equal the label, so the Hamming rate is a little below beta_s.
    low: int | None = None
    high: int | None = None
    keep_clues: bool = False


class RandomReplaceTargets:
    """y* with each supervised cell replaced by a random token at rate beta_s."""

    monotone = True

    def __init__(self, low: int, high: int, schedule: str = "linear", keep_clues: bool = False):
        self.low, self.high, self.schedule, self.keep_clues = low, high, schedule, keep_clues

    def __call__(self, batch, n_sup, generator):
        y = batch["labels"]
        corrupt = _corrupted(batch, n_sup, generator, self.schedule, self.keep_clues)  # (B, N, L)
        # One token per cell for all frames: a cell keeps the same wrong token while corrupted,
        # so the Hamming distance to y* can only fall as the corrupted set shrinks.
        tokens = torch.randint(self.low, self.high + 1, tuple(y.shape), generator=generator, device=generator.device)
        return torch.where(corrupt, tokens.to(y.device)[:, None, :], y[:, None, :].long())


def build_random_replace(config: RandomReplaceConfig, ctx) -> RandomReplaceTargets:
    """Paper variant: y* with random-token replacement at a linearly decreasing rate."""
    low = ctx.spec.pad_id + 1 if config.low is None else config.low
    high = ctx.spec.vocab_size - 1 if config.high is None else config.high
    _check_token(low, "low", ctx)
    _check_token(high, "high", ctx)
    if low > high:
        ctx.fail(f"low {low} > high {high}", at="config")
    return RandomReplaceTargets(low, high, config.schedule, config.keep_clues)


# ----------------------------------------------------------------------------- final


@attrs.frozen(kw_only=True)
class FinalConfig:
    """No options: every step is supervised with y* (TRM's deep supervision)."""


class FinalTargets:
    monotone = True

    def __call__(self, batch, n_sup, generator):
        y = batch["labels"].long()  # (B, L)
        return y[:, None, :].expand(-1, n_sup, -1).clone()  # (B, N, L)


def build_final(config: FinalConfig, ctx) -> FinalTargets:
    """TRM: the final answer y* as the target of every supervision step."""
    return FinalTargets()


@hookimpl
def register_target_generators(register):
    register("reveal_path", RevealPathConfig, build_reveal_path)
    register("mask", MaskConfig, build_mask)
    register("random_replace", RandomReplaceConfig, build_random_replace)
    register("final", FinalConfig, build_final)
