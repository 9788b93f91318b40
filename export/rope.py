"""Rotary tables and the one rotation both towers use.

Both towers are exported with the half-split (GPT-NeoX) rotation
`x * cos + swap_halves(x) * signed_sin`, where `signed_sin = [-sin | sin]` folds the negation
of `rotate_half` into the table. The vision tower's interleaved rotation is turned into this
form by permuting the q/k projection rows inside each head (see `interleaved_to_half_split`).
Tables are computed in float32 with the same ops as the official code so that angles match.
"""

from __future__ import annotations

import torch


def text_rope_tables(head_dim: int, base: float, max_positions: int) -> tuple[torch.Tensor, ...]:
    """cos and signed sin tables [max_positions, head_dim] for the text tower (positions 0..)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(max_positions, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return _half_split_tables(torch.cos(angles), torch.sin(angles))


def vision_rope_angles_interleaved(
    head_dim: int, grid: int, pt_seq_len: int, theta: float, intp_freq: bool
) -> torch.Tensor:
    """Angles [grid*grid, head_dim] in the official interleaved layout (model-facts 5).

    First half of the head dim uses the row position, second half the column; each frequency
    appears twice in adjacent columns; positions are rescaled onto the pre-training grid.
    """
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    ft_seq_len = grid if intp_freq else pt_seq_len
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    per_axis = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # [grid, dim]
    rows = per_axis[:, None, :].expand(grid, grid, dim)
    cols = per_axis[None, :, :].expand(grid, grid, dim)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)


def vision_rope_tables(
    head_dim: int, grid: int, pt_seq_len: int, theta: float, intp_freq: bool
) -> tuple[torch.Tensor, ...]:
    """cos and signed sin tables [1 + grid*grid, head_dim] in half-split layout.

    Row 0 is the CLS token, which the official model does not rotate: cos 1, sin 0 is the
    identity rotation, so the CLS token needs no split/concat around RoPE.
    """
    angles = vision_rope_angles_interleaved(head_dim, grid, pt_seq_len, theta, intp_freq)
    permutation = interleaved_to_half_split(head_dim)
    cos = torch.cos(angles)[:, permutation]
    sin = torch.sin(angles)[:, permutation]
    cos = torch.cat([torch.ones(1, head_dim), cos])
    sin = torch.cat([torch.zeros(1, head_dim), sin])
    # After the permutation each pair (k, k + half) shares one angle: the halves are equal.
    return cos, torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]], dim=-1)


def _half_split_tables(cos_half: torch.Tensor, sin_half: torch.Tensor) -> tuple[torch.Tensor, ...]:
    cos = torch.cat([cos_half, cos_half], dim=-1)
    signed_sin = torch.cat([-sin_half, sin_half], dim=-1)
    return cos, signed_sin


def interleaved_to_half_split(head_dim: int) -> torch.Tensor:
    """Index order that moves pair (2i, 2i+1) to (i, i + head_dim/2).

    Applying it to the rows of the q and k projections inside every head turns the
    interleaved rotation into the half-split one; q·k is unchanged because both sides are
    permuted alike.
    """
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation: multiply-adds against precomputed tables, no per-head loops."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * signed_sin
