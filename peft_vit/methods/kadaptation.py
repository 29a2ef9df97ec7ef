"""KAdaptation (He, Li et al., AAAI 2023; code eric-ai-lab/PEViT).

A parallel update of W_q and W_v (blocks of timm's fused qkv) by a sum of Kronecker products::

    ΔW = scale · Σ_{i=1..n} A_i ⊗ B_i,    A_i = a_i b_iᵀ ∈ R^{32×32},  B_i = u_i v_iᵀ ∈ R^{24×24}

``A_i`` (the "rules") are shared across all layers, one set per adapted matrix kind (q, v);
``B_i`` are per layer and per matrix. A per-layer bias (768) is added to the adapted outputs.
Count on ViT-B/16: 12·(2·32·48 + 768) + 2·32·64 = 50,176.

Since ``(a bᵀ) ⊗ (u vᵀ) = (a⊗u)(b⊗v)ᵀ``, ΔW = P Qᵀ with P, Q ∈ R^{768×n}: the forward is
``x ΔWᵀ = (x Q) Pᵀ``, rank ≤ n, with no 768×768 matrix (except for the released code's dropout
on ΔW in training, ``dropout_mode: matrix`` below).

Choices and differences from the released code (model.py of PEViT; stated here only, the README
links here):

* init: the released code zero-initialises both u and v, so no Kronecker factor ever gets a
  gradient (only the bias and the head train). Here the output-side factor ``u`` starts at zero
  (the model starts as the backbone) and the input-side ``v`` is glorot-uniform (gain √2, the
  released code's ``glorot_uniform``); the shared rules keep the released U(±0.01). ``u`` gets
  a gradient on step 1, every other factor from step 2.
* the update is added to the projection's output (the paper's ``W + ΔW``), i.e. before the
  1/√d attention scaling; the released code adds it to q after that scaling, and reshapes the
  (tokens, batch, D) update straight to (batch·heads, tokens, D/heads) without the transpose
  q gets, so its update lands on other tokens' positions.
* the v path: every published commit of the released code computes v's update with q's
  per-layer factors; here q and v have their own (the paper's two adapted matrices).
* dropout (``dropout``, default 0.5; ``dropout_mode``): ``matrix`` (default) is the released
  code's: element-wise dropout on each adapted 768×768 update ΔW, one mask per forward (so per
  step, shared by every token of the batch); the training forward then forms ΔW and runs one
  matmul with ``W + dropout(ΔW)``. ``terms`` drops whole Kronecker terms instead: dropout on the
  n-dim intermediate ``x Q``, a mask per token; the forward stays low-rank. Both have the same
  expectation; at evaluation both are the plain low-rank forward.
* the intrinsic-dimension step of the paper selects which matrices to adapt; it is fixed here
  to attention q and v (``targets``).
* the bias: the released code holds ONE bias per attention layer and adds it to both the q and
  the v update (``bias: shared``, default, matches the count); ``separate`` gives each adapted
  matrix its own, ``none`` drops it. The bias is not multiplied by ``scale`` (as released).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Delta, Method, PeftModule, adapt_linears, register_method


class KronRules(PeftModule):
    """The shared ``A_i = a_i b_iᵀ`` (a_dim × a_dim) of one matrix kind: a (output side) and
    b (input side), each (n, a_dim, rank)."""

    def __init__(self, n: int, a_dim: int, rank: int = 1, init_range: float = 0.01):
        super().__init__()
        self.a = nn.Parameter(torch.empty(n, a_dim, rank).uniform_(-init_range, init_range))
        self.b = nn.Parameter(torch.empty(n, a_dim, rank).uniform_(-init_range, init_range))


class KronBias(PeftModule):
    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))


def kron_columns(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Columns ``left[i,:,s] ⊗ right[i,:,t]`` for all (i, s, t): (n,p,s) × (n,q,t) -> (p·q, n·s·t)."""
    n, p, s = left.shape
    q, t = right.shape[1:]
    return torch.einsum("nps,nqt->pqnst", left, right).reshape(p * q, n * s * t)


class KAdaptationDelta(Delta):
    def __init__(self, out_features: int, in_features: int, rules: KronRules,
                 bias: Optional[KronBias], b_rank: int = 1, scale: float = 160.0, dropout: float = 0.5,
                 dropout_mode: str = "matrix"):
        super().__init__()
        n, a_dim, _ = rules.a.shape
        if out_features % a_dim or in_features % a_dim:
            raise ValueError(f"KAdaptation: {out_features}×{in_features} does not split into {a_dim}×{a_dim} blocks")
        self.rules = rules  # shared by every layer: count_parameters counts it once
        self.bias_module = bias  # shared by q and v of one layer with bias=shared
        self.u = nn.Parameter(torch.zeros(n, out_features // a_dim, b_rank))
        g = in_features // a_dim
        bound = math.sqrt(2.0) * math.sqrt(6.0 / (g + b_rank))
        self.v = nn.Parameter(torch.empty(n, g, b_rank).uniform_(-bound, bound))
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_mode = dropout_mode

    def factors(self):
        """``ΔW / scale = P Qᵀ``: P (out, n·r), Q (in, n·r)."""
        return kron_columns(self.rules.a, self.u), kron_columns(self.rules.b, self.v)

    def forward(self, x, weight, bias):
        p, q = self.factors()
        if self.dropout_mode == "matrix" and self.dropout.training and isinstance(self.dropout, nn.Dropout):
            y = F.linear(x, self.dropout(p @ q.t() * self.scale).to(x.dtype))  # one mask on ΔW
        else:
            y = (self.dropout(x @ q.to(x.dtype)) @ p.t().to(x.dtype)) * self.scale
        return y if self.bias_module is None else y + self.bias_module.bias.to(y.dtype)

    def delta_weight(self, weight):
        p, q = self.factors()
        return (p @ q.t()) * self.scale

    def delta_bias(self, bias):
        return None if self.bias_module is None else self.bias_module.bias


@register_method("kadaptation")
class KAdaptation(Method):
    batched = "kadaptation"  # every Linear of one kind, all layers at once: methods/batched/kadaptation.py

    def __init__(self, n: int = 32, a_dim: int = 32, a_rank: int = 1, b_rank: int = 1,
                 scale: float = 160.0, dropout: float = 0.5, bias: str = "shared",
                 rule_init_range: float = 0.01, targets: Sequence[str] = ("q", "v"),
                 dropout_mode: str = "matrix"):
        if bias not in ("shared", "separate", "none"):
            raise ValueError(f"bias must be shared | separate | none, not {bias!r}")
        if dropout_mode not in ("matrix", "terms"):
            raise ValueError(f"method.dropout_mode={dropout_mode!r}; choose matrix or terms")
        self.dropout_mode = dropout_mode
        self.n, self.a_dim, self.a_rank, self.b_rank = int(n), int(a_dim), int(a_rank), int(b_rank)
        self.scale, self.dropout, self.bias = float(scale), float(dropout), bias
        self.rule_init_range = float(rule_init_range)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def inject(self, model: nn.Module) -> None:
        layer_bias: Dict[int, KronBias] = {}

        def bias_for(layer: int, out: int) -> Optional[KronBias]:
            if self.bias == "none":
                return None
            if self.bias == "separate":
                return KronBias(out)
            if layer not in layer_bias:
                layer_bias[layer] = KronBias(out)
            if layer_bias[layer].bias.numel() != out:
                raise ValueError("bias=shared needs adapted matrices of equal output size")
            return layer_bias[layer]

        for target in self.targets:  # one set of shared rules per target (q, v)
            rules = KronRules(self.n, self.a_dim, self.a_rank, self.rule_init_range)
            adapt_linears(model, [target], lambda site, rules=rules: KAdaptationDelta(
                site.out_features, site.in_features, rules, bias_for(site.layer, site.out_features), self.b_rank, self.scale, self.dropout, self.dropout_mode))
