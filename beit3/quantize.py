"""int8 encoders for CPU: dynamic quantisation of every ``nn.Linear``.

Every projection of BEiT-3 is an ``nn.Linear`` called as a module (the Multiway experts ``A`` /
``B`` included: :class:`beit3.multiway.Multiway` calls ``self.A(x)``, and attention calls its
``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` experts, never ``F.linear`` on their weights),
so PyTorch's dynamic quantisation reaches all of them: weights become int8 (symmetric, one
scale per tensor), activations are quantised per call from their own range, and the
products run in fbgemm's int8 GEMM. LayerNorms, GELU, the attention softmax, the patch
convolution and the embedding tables stay float32; the embeddings come out float32 and unit-norm
as before.

Chosen by measurement against ONNX Runtime 1.32 int8 (dynamic quantisation of the exported
encoders; beit3-base, batch 8, this 2-core AVX2 CPU, 2026-12-02, prototype runs on a loaded
machine): ORT with uint8 weights ran encode_image in 1925 ms and encode_text in 762 ms, torch
int8 in 1844-1864 ms and 513-526 ms; ORT with int8 weights took 3533 / 496 ms but its cosine to
fp32 fell to 0.978 / 0.966 (AVX2's u8 x s8 instruction saturates), against 0.998 for torch. So
the torch path: no export step, no new dependency, the same module. bench/model_speed.py
--int8 only gives the fp32 / int8 ratio of this path in one run.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from beit3.errors import ConfigError

if TYPE_CHECKING:
    from beit3.checkpoint import Checkpoint

__all__ = ["QUANTIZE_MODES", "quantize_checkpoint", "quantize_model"]

# The modes an index may record for its encoder; None (or "fp32") is the unquantised model.
QUANTIZE_MODES = ("int8",)

M = TypeVar("M", bound=nn.Module)


def _check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ConfigError(
            f"unknown quantisation mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)} "
            "(or none for float32)"
        )


def quantize_model(model: M, mode: str = "int8", *, inplace: bool = False) -> M:
    """Return ``model`` with int8 dynamically quantised ``nn.Linear`` layers (CPU only).

    Args:
        model: a float32 model on the CPU (e.g. :class:`beit3.heads.Beit3ForRetrieval`); its
            class and non-Linear modules are unchanged, so ``encode_image`` / ``encode_text``
            work as before and return (B, D) unit-norm float32.
        mode: ``"int8"``.
        inplace: quantise ``model`` itself instead of a copy (saves one copy of the weights).

    Returns:
        The quantised model, in eval mode.

    Raises:
        ConfigError: an unknown mode, or a model that is not on the CPU.
    """
    _check_mode(mode)
    device = next(iter(model.parameters()), torch.empty(0)).device
    if device.type != "cpu":
        raise ConfigError(
            f"int8 quantisation runs on the CPU only; the model is on {device}: load it with "
            "device='cpu', or use bf16 autocast on the GPU instead"
        )
    from torch.ao.quantization import quantize_dynamic

    target = model if inplace else copy.deepcopy(model)
    target.eval()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the eager dynamic path still
        # ships (and is measured) in the torch we pin.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return target


def quantize_checkpoint(ckpt: Checkpoint, mode: str = "int8") -> Checkpoint:
    """The checkpoint with its model quantised (see :func:`quantize_model`); ``ckpt`` is unchanged.

    The model id stays the checkpoint's (the weights are the same); an index records ``mode``
    beside it, because int8 and fp32 embeddings of one model differ slightly.

    Raises:
        ConfigError: an unknown mode, or a checkpoint loaded onto a GPU.
    """
    _check_mode(mode)
    return dataclasses.replace(ckpt, model=quantize_model(ckpt.model, mode))
