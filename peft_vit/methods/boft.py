"""BOFT (Liu, Qiu, Feng, Xiu, Xue, Yu, Feng, Liu, Heo, Peng, Wen, Black, Weller and Schölkopf,
"Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024; official code
wy1iu/butterfly-oft, whose implementation is ``huggingface/peft``'s ``BOFTConfig``): OFT's
orthogonal matrix as a product of m butterfly factors, each a block-diagonal orthogonal matrix
seen through a fixed permutation, plus a learnt scale of each output unit::

    W' = diag(s) W Mᵀ,   M = B_m ⋯ B_1,   B_i = P_i diag(R_i1, …, R_i,in/b) P_iᵀ

i.e. ``y = s ⊙ (W (M x)) + c`` (the bias is not scaled). R_ij = Cayley(Q_ij) with Q_ij
skew-symmetric b × b (the exact map ``(I − Q)(I + Q)⁻¹``, peft's ``cayley_batch``);
P_1 = I and P_i (i ≥ 2) is the block-butterfly permutation of peft's ``block_butterfly_perm``:
in every group of b·2^(i−1) inputs, split into chunks of b/2, the even chunks first, then the odd
ones. With m = 1 BOFT is OFT (oft.py) with the scale s. Each block stores only the b(b−1)/2
entries above the diagonal of Q (peft stores a full b × b tensor and uses its skew part: the same
function with twice the numbers). Q = 0 and s = 1 at start: the backbone exactly.

``dropout``: the paper's multiplicative dropout (peft's ``boft_dropout``): in training,
int(p · #blocks) random block positions hold the identity, the same positions in every factor.

Defaults: m = 2 factors of blocks b = 8 (the BOFT setting the paper's VTAB-1k table names;
docs/REFERENCE.md §1.16, *open*: not re-checked here) on the q and v blocks of timm's fused qkv
(as oft.py); the paper's VTAB-1k backbone is DINOv2-L. Count on ViT-B/16, per matrix
m · (in/b) · b(b−1)/2 + out = 2 · 96 · 28 + 768 = 6,144; 24 matrices: 147,456.

peft's CPU path (no CUDA extension ``fbd_cuda``) silently sets m = 1; this file has no such
switch: m factors on every device. Mergeable exactly (W' formed in every forward, as oft.py).
Numerically equal to peft's BOFT given the same parameters (tests/test_method_oft.py). All
adapted Linears of one shape run together, the same math: methods/batched/boft.py.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..precision import like
from .base import Method, Site, adapt_linears, register_method
from .oft import SkewBlocks, block_dropout, cayley, check_block_size, rotate_inputs


def butterfly_perm(n: int, block_size: int, factor: int) -> torch.Tensor:
    """P_{factor+1} as a gather index (``x[perm]`` = ``P x``; P[p, perm[p]] = 1): identity for
    factor 0, else in each group of ``block_size · 2^factor`` the even chunks of ``block_size/2``
    then the odd ones."""
    group, chunk = block_size * 2 ** factor, block_size // 2
    order = list(range(0, group // chunk, 2)) + list(range(1, group // chunk, 2))
    within = torch.cat([torch.arange(j * chunk, (j + 1) * chunk) for j in order])
    return (torch.arange(0, n, group)[:, None] + within).flatten()


class BOFTDelta(SkewBlocks):
    def __init__(self, in_features: int, out_features: int, factors: int, block_size: int, dropout: float):
        super().__init__(block_size)
        self.p = float(dropout)
        blocks = in_features // block_size
        self.boft_r = nn.Parameter(torch.zeros(factors, blocks, block_size * (block_size - 1) // 2))
        self.boft_s = nn.Parameter(torch.ones(out_features))
        self.factors = factors
        for i in range(1, factors):  # P_1 = I
            perm = butterfly_perm(in_features, block_size, i)
            self.register_buffer(f"perm_{i}", perm, persistent=False)
            self.register_buffer(f"inverse_{i}", perm.argsort(), persistent=False)

    def rotated(self, weight: torch.Tensor) -> torch.Tensor:
        """``W Mᵀ`` = W B_1ᵀ ⋯ B_mᵀ, each ``B_iᵀ`` a gather, a blockwise product and a gather."""
        blocks = block_dropout(cayley(self.skew(self.boft_r)), self.p, self.training)
        if blocks.dtype != weight.dtype:
            blocks = blocks.to(weight.dtype)
        for i, rot in enumerate(blocks.unbind(0)):
            if i:  # W P_i: the columns gathered by the inverse permutation (P_1 = I)
                weight = weight.index_select(1, getattr(self, f"inverse_{i}"))
            weight = rotate_inputs(weight, rot)
            if i:  # (·) P_iᵀ
                weight = weight.index_select(1, getattr(self, f"perm_{i}"))
        return weight

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        s = like(self.boft_s, weight.dtype)
        return s[:, None] * self.rotated(weight) - weight


@register_method("boft")
class BOFT(Method):
    batched = "boft"  # every adapted Linear of one shape at once: methods/batched/boft.py

    def __init__(self, factors: int = 2, block_size: int = 8, targets: Sequence[str] = ("q", "v"),
                 dropout: float = 0.0):
        if int(factors) < 1:
            raise ValueError(f"method.factors={factors}: BOFT needs at least one butterfly factor (1 = OFT)")
        if int(factors) > 1 and int(block_size) % 2:
            raise ValueError(f"method.block_size={block_size}: butterfly factors need an even block size")
        self.factors, self.block_size, self.dropout = int(factors), int(block_size), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def _delta(self, site: Site) -> BOFTDelta:
        check_block_size(site, self.block_size, 2 ** (self.factors - 1))
        return BOFTDelta(site.in_features, site.out_features, self.factors, self.block_size, self.dropout)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, self._delta, weight_space=True)
