"""Householder-SVD adaptation (HTA; Dong et al., NeurIPS 2024).

Every adapted matrix gets a parallel update ``ΔW = H(v_l) · diag(d) · H(v_r) + w_out · w_in``:
two Householder reflections around a learned diagonal (an SVD-like update whose rank is the
number of non-zero entries of ``d``, so it may differ per layer) plus a rank-D' add-on (the
paper's ``W_down · W_up``), named here by the side it acts on: ``w_in`` (D' × in) reads the
input, ``w_out`` (out × D') writes the output.

Choices where the paper is silent (this is the one place they are stated; the README links here):

* reflection (``reflection``): ``orthogonal`` ``H(v) = I − 2vvᵀ/‖v‖²`` (default) or ``printed``
  ``H(v) = I − vvᵀ`` (the formula as printed; orthogonal only when ‖v‖² = 2).
* init: ``d = 0``, ``v_l``, ``v_r`` random unit vectors (N(0, I) normalised). With ``d = 0``,
  ``v_l`` and ``v_r`` get no gradient on the first step (they do from step 2). The add-on
  (``addon_init``), in both cases zero at start, so the model starts as the backbone:

  - ``lora`` (default), as LoRA's A and B: ``w_in`` kaiming-uniform(a=√5) with fan_in = in, i.e.
    U(±1/√in), and ``w_out = 0``;
  - ``output_kaiming`` (this project's first choice): ``w_out`` kaiming-uniform(a=√5) with
    fan_in = D', i.e. U(±1/√D') (U(±1) at D' = 1), and ``w_in = 0``. Under Adam every entry of
    the zero factor moves by about lr on step 1; in Frobenius norm this add-on's first update is
    then about √(in/3) times the H-term's (16× at in = 768; ``lora``: about 1/√3 of it), and it
    swamps the part whose per-layer rank is the paper's claim.
* weight decay (``decay_vectors``): the paper tunes weight decay over {0.05 … 0} without saying
  which tensors it acts on. ``false`` (default) keeps timm's rule, under which the 1-d ``d``,
  ``v_l`` and ``v_r`` never decay: the grid then acts only on the add-on and the head. ``true``
  decays them as well (for ``v_l``, ``v_r`` under the orthogonal reflection that shrinks only
  their norm, which H ignores, and so raises their effective step size).
* "adapter dropout" (``dropout``) is applied to the adapter's input ``x`` (both terms),
  default 0: the paper tunes it per task over {0.5 … 0}.

The forward never forms a D×D matrix: ``x H(v) = x − c (x·v) vᵀ`` is O(D) per token
(``c = 2/‖v‖²`` or 1), and H is symmetric, so ``x ΔWᵀ = ((x H(v_r))[:k] ⊙ d) H(v_l)``; expanded,
that is a diagonal term plus a rank-2 one (:meth:`HouseholderDelta.low_rank`). In training all
matrices of one shape run together (methods/batched/householder.py), the same math.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdaptedLinear, Delta, Method, adapt_linears, layer_index, register_method

TARGET_PRESETS = {"qv": ["q", "v"], "qkvo": ["q", "k", "v", "o"],
                  "qkvo_mlp": ["q", "k", "v", "o", "fc1", "fc2"]}
MATRIX_NAMES = {"attn.qkv": "qkv", "attn.proj": "o", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}


def reflect(x: torch.Tensor, v: torch.Tensor, orthogonal: bool = True) -> torch.Tensor:
    """``x H(v)`` for row vectors x (..., D), in O(D) per row."""
    c = 2.0 / v.pow(2).sum() if orthogonal else 1.0
    return x - (c * (x @ v)).unsqueeze(-1) * v


def householder_matrix(v: torch.Tensor, orthogonal: bool = True) -> torch.Tensor:
    """The explicit H(v) (for merging and tests only)."""
    c = 2.0 / v.pow(2).sum() if orthogonal else 1.0
    return torch.eye(v.numel(), dtype=v.dtype, device=v.device) - c * torch.outer(v, v)


ADDON_INITS = ("lora", "output_kaiming")


class HouseholderDelta(Delta):
    def __init__(self, out_features: int, in_features: int, rank: int = 1,
                 reflection: str = "orthogonal", dropout: float = 0.0, addon_init: str = "lora"):
        super().__init__()
        if reflection not in ("orthogonal", "printed"):
            raise ValueError(f"reflection must be 'orthogonal' or 'printed', not {reflection!r}")
        if addon_init not in ADDON_INITS:
            raise ValueError(f"method.addon_init={addon_init!r}; choose one of {', '.join(ADDON_INITS)}")
        self.orthogonal = reflection == "orthogonal"
        self.k = min(out_features, in_features)
        self.v_l = nn.Parameter(F.normalize(torch.randn(out_features), dim=0))
        self.v_r = nn.Parameter(F.normalize(torch.randn(in_features), dim=0))
        self.d = nn.Parameter(torch.zeros(self.k))
        self.rank = int(rank)
        if self.rank > 0:
            self.w_in = nn.Parameter(torch.zeros(self.rank, in_features))
            self.w_out = nn.Parameter(torch.zeros(out_features, self.rank))
            nn.init.kaiming_uniform_(self.w_in if addon_init == "lora" else self.w_out, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def low_rank(self):
        """``x ΔWᵀ = pad(x[:k] ⊙ d) + (x V_in) V_out`` with V_in (in, 2+D'), V_out (2+D', out).

        Expanding the two reflections: with s_r = x·v_r and t = pad((x H(v_r))[:k] ⊙ d),
        t = pad(x[:k] ⊙ d) − c_r s_r pad(v_r[:k] ⊙ d) and t·v_l = x·pad(d ⊙ v_l[:k]) − c_r α s_r
        (α = Σ v_r d v_l), so ``t H(v_l)`` is the diagonal term plus a rank-2 one; w_out w_in adds
        D' more columns. One elementwise product and two thin matmuls, as cheap as LoRA."""
        v_l, v_r, d, k = self.v_l, self.v_r, self.d, self.k
        c_l = 2.0 / v_l.pow(2).sum() if self.orthogonal else 1.0
        c_r = 2.0 / v_r.pow(2).sum() if self.orthogonal else 1.0
        dv_l = F.pad(d * v_l[:k], (0, v_r.numel() - k))                 # (in,)
        dv_r = F.pad(d * v_r[:k], (0, v_l.numel() - k))                 # (out,)
        alpha = (d * v_r[:k] * v_l[:k]).sum()
        vin = [v_r, dv_l]
        vout = [c_r * (c_l * alpha * v_l - dv_r), -c_l * v_l]
        if self.rank > 0:
            return torch.cat([torch.stack(vin, 1), self.w_in.t()], 1), torch.cat([torch.stack(vout), self.w_out.t()])
        return torch.stack(vin, 1), torch.stack(vout)

    def forward(self, x, weight, bias):
        x = self.dropout(x)
        vin, vout = self.low_rank()
        diag = x[..., : self.k] * self.d.to(x.dtype)
        out = self.v_l.numel()
        if out > self.k:
            diag = F.pad(diag, (0, out - self.k))
        return diag + (x @ vin.to(x.dtype)) @ vout.to(x.dtype)

    def delta_weight(self, weight):
        h_l = householder_matrix(self.v_l, self.orthogonal)
        h_r = householder_matrix(self.v_r, self.orthogonal)
        dw = (h_l[:, : self.k] * self.d) @ h_r[: self.k, :]
        if self.rank > 0:
            dw = dw + self.w_out @ self.w_in
        return dw


@register_method("householder")
class Householder(Method):
    batched = "householder"  # every adapted matrix of one shape at once: methods/batched/householder.py

    def __init__(self, rank: int = 1, targets: Union[str, Sequence[str]] = ("q", "k", "v", "o"),
                 reflection: str = "orthogonal", dropout: float = 0.0, addon_init: str = "lora",
                 decay_vectors: bool = False):
        if isinstance(targets, str):  # a preset, or one target name
            targets = TARGET_PRESETS.get(targets, [targets])
        if addon_init not in ADDON_INITS:
            raise ValueError(f"method.addon_init={addon_init!r}; choose one of {', '.join(ADDON_INITS)}")
        self.targets = list(targets)
        self.rank, self.reflection, self.dropout = int(rank), reflection, float(dropout)
        self.addon_init, self.decay_vectors = addon_init, bool(decay_vectors)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda site: HouseholderDelta(
            site.out_features, site.in_features, self.rank, self.reflection, self.dropout, self.addon_init))

    def no_weight_decay(self, model: nn.Module):
        """timm's rule; with ``decay_vectors`` d, v_l and v_r decay too (module docstring)."""
        skip = super().no_weight_decay(model)
        if self.decay_vectors:
            skip -= {f"{name}.{p}" for name, mod in model.named_modules() for p in mod._parameters
                     if _vectors(mod, p)}
        return skip

    # ------------------------------------------------------------------ diagnostics

    def diagnostics(self, model: nn.Module) -> List[Dict]:
        """One row per adapted matrix, in the model's order: layer, matrix, |d| summary and the
        ranks of the H-term (:func:`rank_summary`)."""
        rows = []
        layer_of = layer_index(model)
        for name, mod in model.named_modules():
            if not isinstance(mod, AdaptedLinear):
                continue
            kind = next((v for k, v in MATRIX_NAMES.items() if name.endswith(k)), name)
            for block in sorted(mod.deltas, key=lambda b: mod.slices[b][0]):
                delta = mod.deltas[block]
                if isinstance(delta, HouseholderDelta):
                    rows.append(dict(layer=layer_of(name), matrix=kind if block == "all" else block,
                                     **rank_summary(delta.d.detach())))
        return rows

    def report(self, model: nn.Module) -> dict:
        """For results.json: the per-matrix ranks; ``effective_rank`` (the one plotted by
        ``peft_vit.report.plots``) is the 90 % energy rank."""
        return {"effective_rank_is": EFFECTIVE_RANK_IS, "per_matrix": self.diagnostics(model)}


RANK_CUTS = (0.01, 0.1, 0.5)    # rank_above_<p>pct_max: #{i : |d_i| > cut · max|d|}
ENERGY_LEVELS = (0.9, 0.99)     # energy_rank_<p>: the fewest d_i holding this share of Σ d_i²
EFFECTIVE_RANK_IS = "energy_rank_90: the fewest |d_i| holding 90% of sum(d_i^2)"


def rank_summary(d: torch.Tensor) -> Dict[str, float]:
    """Ranks of ``H(v_l) diag(d) H(v_r)`` (the rank of diag(d), the reflections being invertible)
    at several readings. A cut at 1 % of max|d| counts every entry training moved a little (on a
    toy with a rank-8 target it read 714 of 768); the higher cuts and the energy ranks say how
    many entries carry the update. All 0 for d = 0."""
    a = d.abs().double()
    mx = float(a.max())
    out = dict(d_abs_min=float(a.min()), d_abs_max=mx, d_abs_mean=float(a.mean()), full_rank=a.numel())
    for cut in RANK_CUTS:
        out[f"rank_above_{cut * 100:g}pct_max"] = int((a > cut * mx).sum()) if mx > 0 else 0
    energy = a.square().sort(descending=True).values.cumsum(0)
    for level in ENERGY_LEVELS:  # the first k whose top-k energy reaches level · total
        out[f"energy_rank_{level * 100:g}"] = int((energy < level * energy[-1]).sum()) + 1 if mx > 0 else 0
    out["effective_rank"] = out["energy_rank_90"]
    return out


def _vectors(module: nn.Module, name: str) -> bool:
    """Is ``module.name`` a ``d``, ``v_l`` or ``v_r`` (or a packed tensor of them, methods/batched)?"""
    held = module.members_of(name) if hasattr(module, "members_of") else [(module, name)]
    return all(isinstance(m, HouseholderDelta) and n in ("d", "v_l", "v_r") for m, n in held)
