"""FacT-TK (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer",
AAAI 2023; official code JieShibo/PETL-ViT, folder FacT, file fact_tk.py).

The increments of all adapted matrices, cut into D×D pieces (q, k, v, o of every attention and
the four D×D pieces of each MLP's fc1 and fc2: 12 per ViT block, 144 on ViT-B), form one
tensor of shape (pieces, D, D) that is factorised in Tucker format with factors shared by all
layers::

    ΔW_j = s · V T_jᵀ U,    T_j = Σ_k C[:, :, k] P[k, j]   (the core C ∈ R^{r×r×r} times P ∈ R^{r×pieces})

``U`` (r×D, input side) and ``V`` (D×r, output side) are shared by every piece. A Linear with
several pieces runs ``y = x Wᵀ + b + dropout(x Q) R`` with ``Q = blockdiag(Uᵀ) K`` (in × n·r) and
``R = s · blockdiag(Vᵀ)`` (n·r × out), ``K`` its pieces' cores side by side: dropout (0.1) sits
on the r-dim intermediate after the core, as in the official code. All cores come from one matmul
``C·P`` per forward (methods/batched/fact_tk.py).
A training step costs 1.13× full fine-tuning's ops (``scripts/benchmark.py --ops``, budget 1.14):
four adapted Linears per block, each with its own low-rank path, since the dropout acts per token
on the intermediate and so rules out one matmul with W + ΔW.

Count on ViT-B/16 (rank 32): U 24,576 + V 24,576 + P 32·144 = 4,608 + C 32³ = 32,768 → 86,528
(rank 8: 13,952). The paper's FacT-TK≤32 uses rank 16 or 32 per task and prints 0.069M, the
mean over the VTAB groups of these per-task counts; its FacT-TK8 prints 0.014M.

Init (official): U as ``nn.Linear(D, r)``'s default (kaiming-uniform, a=√5), V zeros (so the
model starts as the backbone), C and P xavier-uniform. Everything trains with weight decay
(official AdamW over all of them).

Choices from the official code where the paper is silent:

* ``scale`` s: per task in the official configs (configs/tk/*.yaml): 10 for 9 of the 19 VTAB
  tasks (the default here), 100 for dSprites-loc, EuroSAT, sNORB-azi, SVHN, 1 for Retinopathy,
  dSprites-ori, Flowers, SUN397, 0.1 for CIFAR-100, 0.01 for DTD; ``rank`` 32, or 16 for
  Clevr-dist, Retinopathy, DTD, Pets, sNORB-ele, SUN397.
* piece order: per block q, k, v, o, fc1's four, fc2's four (columns of P).
* ``layout``: ``official`` (default) reproduces how the official forward maps cores to the MLP
  pieces: it reshapes the (r, r, 4) slice of C·P for fc1 (and fc2) to (r, 4r) directly, so each
  fc piece's core interleaves entries of the four slices (and fc2's is used transposed). The
  attention pieces get one slice each. ``tucker`` gives every piece its own slice T_j, the
  paper's formula. Both have the same count and start.
* Swin: the official code only handles ViT (a single D-wide U, V); a Swin's stages differ in
  width, so it raises :class:`~peft_vit.methods.base.UnsupportedBackboneError`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .base import (Delta, Mergeable, Method, PeftModule, UnsupportedBackboneError, adapt_linears,
                   backbone_family, register_method)

TARGETS = ("qkv", "o", "fc1", "fc2")  # whole Linears, in the official piece order


def single_width(model: nn.Module, method: str) -> int:
    """The one embedding width D that FacT's U, V (shared by every layer) need; other families refused."""
    family = backbone_family(model)
    if family != "vit":
        why = "Swin's stages differ in width" if family == "swin" else "it has no single embedding width"
        raise UnsupportedBackboneError(
            f"{method} shares one D-wide U, V across all layers, but {why} (the official code handles "
            f"ViT only): not available on {family}; use lora, vera or another per-layer method there")
    return model.embed_dim


class FacTFactors(Mergeable, PeftModule):
    """The shared factors: u (r, D), v (D, r), core c (r, r, r), p (r, pieces); ``model.fact_tk``.
    Merging folds them into every adapted Linear, then removes them."""

    def __init__(self, dim: int, rank: int, pieces: int):
        super().__init__()
        self.u = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # nn.Linear(dim, rank)'s default
        self.v = nn.Parameter(torch.zeros(dim, rank))
        self.c = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, rank, rank)))
        self.p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, pieces)))

    def merge(self) -> None:
        return None

    def cores(self) -> torch.Tensor:
        """(pieces, r, r): T_j[a, b] = Σ_k c[a, b, k] p[k, j]."""
        r = self.c.shape[0]
        return (self.p.t() @ self.c.reshape(r * r, r).t()).view(-1, r, r)


class FacTDelta(Delta):
    """One adapted Linear: ``p_in`` × ``p_out`` D×D pieces (one of them 1), cores from columns
    ``first .. first + n`` of P."""

    def __init__(self, factors: FacTFactors, first: int, p_in: int, p_out: int, interleave: bool,
                 scale: float, dropout: float):
        super().__init__()
        self.__dict__["factors"] = factors  # plain reference: the model owns it (model.fact_tk)
        self.first, self.p_in, self.p_out, self.interleave = first, p_in, p_out, interleave
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def kmat(self, t: torch.Tensor) -> torch.Tensor:
        """The pieces' cores (..., n, r, r) as one (p_in·r, p_out·r) matrix."""
        *lead, n, r, _ = t.shape
        if self.interleave:  # the official MLP reshape: entries ordered (a, b, piece)
            k = t.movedim(-3, -1).reshape(*lead, r, n * r)
            return k if self.p_in == 1 else k.transpose(-1, -2)
        if self.p_in == 1:
            return t.movedim(-3, -2).reshape(*lead, r, n * r)
        return t.reshape(*lead, n * r, r)

    def q_from(self, k: torch.Tensor) -> torch.Tensor:
        """Q = blockdiag(Uᵀ) K: (..., p_in·D, p_out·r)."""
        ut = self.factors.u.t()
        if self.p_in == 1:
            return ut @ k
        *lead, _, r = k.shape
        return (ut @ k.reshape(*lead, self.p_in, -1, r)).reshape(*lead, -1, r)

    def r_mat(self) -> torch.Tensor:
        """R = s · blockdiag(Vᵀ): (p_out·r, p_out·D)."""
        vt = self.factors.v.t() * self.scale
        return vt if self.p_out == 1 else torch.block_diag(*[vt] * self.p_out)

    def qr(self):
        n = self.p_in * self.p_out
        return self.q_from(self.kmat(self.factors.cores()[self.first:self.first + n])), self.r_mat()

    def forward(self, x, weight, bias):
        q, r = self.qr()
        return self.dropout(x @ q.to(x.dtype)) @ r.to(x.dtype)

    def delta_weight(self, weight):
        q, r = self.qr()
        return (q @ r).t()


@register_method("fact_tk")
class FacTTK(Method):
    batched = "fact_tk"  # all cores in one matmul, every Linear of one kind at once: methods/batched/fact_tk.py

    def __init__(self, rank: int = 32, scale: float = 10.0, dropout: float = 0.1,
                 targets: Sequence[str] = TARGETS, layout: str = "official"):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"fact_tk: targets {bad} not supported; choose among {list(TARGETS)} (whole Linears)")
        if layout not in ("official", "tucker"):
            raise ValueError(f"fact_tk: layout={layout!r}; choose official or tucker")
        self.rank, self.scale, self.dropout, self.layout = int(rank), float(scale), float(dropout), layout

    def inject(self, model: nn.Module) -> None:
        dim = single_width(model, "fact_tk (FacT-TK)")
        order = {t: i for i, t in enumerate(TARGETS)}
        sites: list = []
        for target in sorted(self.targets, key=order.get):
            def make(site, target=target):
                if site.in_features % dim or site.out_features % dim:
                    raise ValueError(f"fact_tk: {site.name} ({site.out_features}×{site.in_features}) does not "
                                     f"split into {dim}×{dim} pieces")
                p_in, p_out = site.in_features // dim, site.out_features // dim
                if min(p_in, p_out) != 1:
                    raise ValueError(f"fact_tk: {site.name} has {p_out}×{p_in} pieces; one side must be {dim}")
                d = FacTDelta(None, 0, p_in, p_out, self.layout == "official" and target in ("fc1", "fc2"),
                              self.scale, self.dropout)
                sites.append((site.layer, order[target], d))
                return d
            adapt_linears(model, [target], make)
        first = 0
        for _, _, d in sorted(sites, key=lambda s: s[:2]):  # P's columns: block by block, official order
            d.first = first
            first += d.p_in * d.p_out
        factors = FacTFactors(dim, self.rank, first)
        model.add_module("fact_tk", factors)
        for _, _, d in sites:
            d.__dict__["factors"] = factors
