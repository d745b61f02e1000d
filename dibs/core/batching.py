"""Padding and token-budget chunking helpers shared by generation and training, pure torch."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["pad_right", "pad_left", "chunk_by_tokens"]


def pad_right(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors, padding on the right. Returns ids [B, L] and attention mask [B, L]."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors, padding on the left (prompts for batched generation). [B, L] twice."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, length - len(s) :] = s
        mask[row, length - len(s) :] = 1
    return ids, mask


def chunk_by_tokens(lengths: Sequence[int], extra: int, token_budget: int) -> list[list[int]]:
    """Split row indices (taken in the given order) into chunks whose padded size
    rows × (longest length + extra) stays within ``token_budget``; a chunk always holds >= 1 row."""
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        grown = max(longest, length)
        if current and (len(current) + 1) * (grown + extra) > token_budget:
            chunks.append(current)
            current, grown = [], length
        current.append(index)
        longest = grown
    if current:
        chunks.append(current)
    return chunks
