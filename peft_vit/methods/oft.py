"""OFT (Qiu, Liu, Feng, Xiu, Xue, Yu, Feng, Liu, Weller and Schölkopf, "Controlling Text-to-Image
Diffusion by Orthogonal Finetuning", NeurIPS 2023; official code Zeju1997/oft; reference
implementation ``huggingface/peft``'s ``OFTConfig``): the frozen weight is multiplied by a learnt
block-diagonal orthogonal matrix acting on the input features::

    W' = W Rᵀ,   R = diag(R_1, …, R_{in/b}),   R_i = Cayley(Q_i),  Q_i = −Q_iᵀ (b × b)

i.e. ``y = W'x + c = W (R x) + c``, the input rotated blockwise (peft rotates the input, ``x R``
for a row vector; the same map). Each block stores only the b(b−1)/2 entries above the diagonal
of its skew-symmetric Q (as peft ≥ 0.15 does; the official code keeps a full b × b tensor and
uses its skew part, the same function with twice the numbers). Q = 0 at start: R = I, the
backbone exactly.

Cayley map (``neumann_terms``): ``0`` (default) the exact map, ``(I − Q)(I + Q)⁻¹`` solved as
peft's ``use_cayley_neumann=False`` does (the paper writes (I + Q)(I − Q)⁻¹, the same family of
orthogonal matrices with Q ↦ −Q); ``k ≥ 2`` peft's truncated Neumann series of (I + Q)(I − Q)⁻¹
as peft counts its terms (its default k = 5: ``I + 2Q + 2Q² + 2Q³ + Q⁴``; cheaper, only
approximately orthogonal).

``dropout``: the multiplicative dropout of BOFT's paper (peft's ``module_dropout``): in training,
int(p · #blocks) random blocks are replaced by the identity.

Defaults, where neither OFT paper nor its code has a ViT-B setting: block size b = 16, the OFT
setting the BOFT paper's VTAB-1k table names (docs/REFERENCE.md §1.16, *open*: not re-checked
here), on the q and v blocks of timm's fused qkv (a choice, the pair VeRA and LoRA ``[q, v]``
adapt in this project). Count on ViT-B/16: 24 matrices · (768/16 blocks) ·
(16·15/2) = 24 · 48 · 120 = 138,240. Not implemented: COFT (peft's ``coft``: a projection of Q
into an ε-ball after each step) and ``block_share``.

Mergeable exactly: W' is formed in every forward (one matmul with W' per Linear, no extra pass
over the tokens) and folds into the Linear. Numerically equal to peft's OFT given the same
parameters (tests/test_method_oft.py). All adapted Linears of one shape run together, the same
math: methods/batched/oft.py (with dropout each matrix draws its own blocks, as here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..precision import like
from .base import Delta, Method, Site, adapt_linears, register_method


def skew_map(size: int) -> torch.Tensor:
    """(size(size−1)/2, size²): ``vec @ skew_map(size)`` is the flattened skew-symmetric matrix
    with ``vec`` above the diagonal (row-major, as ``torch.triu_indices``) and −vec below it."""
    rows, cols = torch.triu_indices(size, size, 1)
    out = torch.zeros(rows.numel(), size * size)
    k = torch.arange(rows.numel())
    out[k, rows * size + cols] = 1.0
    out[k, cols * size + rows] = -1.0
    return out


def cayley(q: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """Orthogonal (…, b, b) blocks from skew-symmetric ones (module docstring)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    if neumann_terms == 0:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    # peft's series: I + 2Q (k = 2); I + 2Q + 2Q² + … + 2Q^{k−2} + Q^{max(3, k−1)} (k ≥ 3)
    r = eye + 2 * q
    if neumann_terms >= 3:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


class SkewBlocks(Delta):
    """A Delta holding skew-symmetric b × b blocks by their upper triangles (``skew(vec)``)."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.register_buffer("skew_map", skew_map(block_size), persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        return (vec @ self.skew_map).view(*vec.shape[:-1], self.block_size, self.block_size)


def block_dropout(blocks: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Replace int(p · D) of the D blocks (dim −3) by the identity, the same ones in every leading
    dim (peft's MultiplicativeDropoutLayer)."""
    n = blocks.shape[-3]
    if not training or p <= 0 or n == 1:
        return blocks
    mask = torch.zeros(n, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(n, device=blocks.device)[: int(p * n)]] = 1
    mask = mask[:, None, None]
    return (1 - mask) * blocks + mask * torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)


def rotate_inputs(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W Rᵀ`` for block-diagonal R = diag(blocks): (out, in) · (in/b, b, b) -> (out, in)."""
    n, b, _ = blocks.shape
    return torch.einsum("onk,nck->onc", weight.reshape(weight.shape[0], n, b), blocks).reshape(weight.shape)


def check_block_size(site: Site, size: int, multiple: int = 1) -> int:
    """The number of blocks of ``size`` in the input of ``site``; a clear error when they do not tile it."""
    if size < 2 or site.in_features % (size * multiple):
        what = f"block_size · 2^(factors−1) = {size * multiple}" if multiple > 1 else f"block_size={size}"
        raise ValueError(f"{site.name}: {site.in_features} input features do not split into blocks of "
                         f"{what}; choose method.block_size (≥ 2) dividing {site.in_features}")
    return site.in_features // size


class OFTDelta(SkewBlocks):
    def __init__(self, blocks: int, block_size: int, neumann_terms: int, dropout: float):
        super().__init__(block_size)
        self.neumann_terms, self.p = int(neumann_terms), float(dropout)
        self.oft_r = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2))

    def rotation(self) -> torch.Tensor:
        return block_dropout(cayley(self.skew(self.oft_r), self.neumann_terms), self.p, self.training)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.rotation()
        return rotate_inputs(weight, like(r, weight.dtype)) - weight


@register_method("oft")
class OFT(Method):
    batched = "oft"  # every adapted Linear of one shape at once: methods/batched/oft.py

    def __init__(self, block_size: int = 16, targets: Sequence[str] = ("q", "v"), neumann_terms: int = 0,
                 dropout: float = 0.0):
        if int(neumann_terms) < 0 or int(neumann_terms) == 1:
            raise ValueError(f"method.neumann_terms={neumann_terms}: 0 (the exact Cayley map) or ≥ 2 terms")
        self.block_size, self.neumann_terms, self.dropout = int(block_size), int(neumann_terms), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def _delta(self, site: Site) -> OFTDelta:
        return OFTDelta(check_block_size(site, self.block_size), self.block_size, self.neumann_terms, self.dropout)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, self._delta, weight_space=True)
