"""Multiway routing: one expert per modality for every LayerNorm, projection and FFN.

The official checkpoints name the two experts ``A`` (vision) and ``B`` (language); we keep those
names so that Microsoft's state dicts load unchanged (``...q_proj.A.weight``). Routing is explicit:
the encoder keeps its hidden state as a pair ``(vision, text)`` of tensors, either of which may be
None, and only joins them for the joint self-attention. This replaces torchscale's
``split_position`` attribute, which is pushed into every module before each forward.
"""

from __future__ import annotations

import copy
from typing import Generic, TypeAlias, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["Multiway", "Parts", "join_parts", "split_parts"]

# (vision tokens (B, Nv, ...), text tokens (B, Nt, ...)); None where a modality is absent.
Parts: TypeAlias = tuple[Tensor | None, Tensor | None]

M = TypeVar("M", bound=nn.Module)


class Multiway(nn.Module, Generic[M]):
    """Two independent copies of a module: ``A`` for vision tokens, ``B`` for language tokens.

    Not called directly: :meth:`route` applies the experts to a ``(vision, text)`` pair, and
    callers that need one expert (the position tables) use ``.A`` / ``.B``.

    Args:
        vision: the vision expert.
        language: the language expert; a deep copy of ``vision`` when omitted.
    """

    def __init__(self, vision: M, language: M | None = None) -> None:
        super().__init__()
        self.A: M = vision
        self.B: M = language if language is not None else copy.deepcopy(vision)

    def route(self, parts: Parts) -> Parts:
        """Apply A to the vision part and B to the text part."""
        vision, text = parts
        return (
            self.A(vision) if vision is not None else None,
            self.B(text) if text is not None else None,
        )


def join_parts(parts: Parts) -> Tensor:
    """Concatenate the present parts along the sequence dimension."""
    vision, text = parts
    if vision is None:
        assert text is not None, "join_parts needs at least one part"
        return text
    if text is None:
        return vision
    return torch.cat([vision, text], dim=1)


def split_parts(x: Tensor, num_vision_tokens: int) -> Parts:
    """Split (B, T, ...) into (B, n, ...) vision and (B, T - n, ...) text; empty parts are None."""
    n = num_vision_tokens
    if n >= x.shape[1]:
        return x, None
    if n == 0:
        return None, x
    return x[:, :n], x[:, n:]
