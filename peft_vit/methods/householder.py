"""Householder-SVD adaptation (HTA; Dong et al., NeurIPS 2024), SPEC §2.1.

Every adapted matrix gets a parallel update ``ΔW = H(v_l) · diag(d) · H(v_r) + W_down · W_up``:
two Householder reflections around a learned diagonal (an SVD-like update whose rank is the
number of non-zero entries of ``d``, so it may differ per layer) plus a rank-D' add-on.

Choices where the paper is silent (documented in the README):

* reflection: ``orthogonal`` ``H(v) = I − 2vvᵀ/‖v‖²`` (default) or ``printed`` ``H(v) = I − vvᵀ``
  (the formula as printed in the paper; it is orthogonal only when ‖v‖² = 2);
* init: ``d = 0`` and ``W_up = 0`` so the model starts as the backbone; ``v_l``, ``v_r`` are
  random unit vectors (N(0, I) normalised); ``W_down`` is kaiming-uniform(a=√5) like LoRA's A.
  With ``d = 0``, ``v_l`` and ``v_r`` get no gradient on the first step (they do from step 2);
* "adapter dropout" is applied to the adapter's input ``x`` (both terms), default 0: the paper
  tunes it per task over {0.5 … 0}.

The forward never forms a D×D matrix: ``x H(v) = x − c (x·v) vᵀ`` is O(D) per token
(``c = 2/‖v‖²`` or 1), and H is symmetric, so ``x ΔWᵀ = ((x H(v_r))[:k] ⊙ d) H(v_l)``; expanded,
that is a diagonal term plus a rank-2 one (:meth:`HouseholderDelta.low_rank`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdaptedLinear, Delta, Method, _layer_index, adapt_linears, register_method

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


class HouseholderDelta(Delta):
    def __init__(self, out_features: int, in_features: int, rank: int = 1,
                 reflection: str = "orthogonal", dropout: float = 0.0):
        super().__init__()
        if reflection not in ("orthogonal", "printed"):
            raise ValueError(f"reflection must be 'orthogonal' or 'printed', not {reflection!r}")
        self.orthogonal = reflection == "orthogonal"
        self.k = min(out_features, in_features)
        self.v_l = nn.Parameter(F.normalize(torch.randn(out_features), dim=0))
        self.v_r = nn.Parameter(F.normalize(torch.randn(in_features), dim=0))
        self.d = nn.Parameter(torch.zeros(self.k))
        self.rank = int(rank)
        if self.rank > 0:
            self.w_down = nn.Parameter(torch.empty(out_features, self.rank))
            self.w_up = nn.Parameter(torch.zeros(self.rank, in_features))
            nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def low_rank(self):
        """``x ΔWᵀ = pad(x[:k] ⊙ d) + (x V_in) V_out`` with V_in (in, 2+D'), V_out (2+D', out).

        Expanding the two reflections: with s_r = x·v_r and t = pad((x H(v_r))[:k] ⊙ d),
        t = pad(x[:k] ⊙ d) − c_r s_r pad(v_r[:k] ⊙ d) and t·v_l = x·pad(d ⊙ v_l[:k]) − c_r α s_r
        (α = Σ v_r d v_l), so ``t H(v_l)`` is the diagonal term plus a rank-2 one; W_down W_up adds
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
            return torch.cat([torch.stack(vin, 1), self.w_up.t()], 1), torch.cat([torch.stack(vout), self.w_down.t()])
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
            dw = dw + self.w_down @ self.w_up
        return dw


@register_method("householder")
class Householder(Method):
    def __init__(self, rank: int = 1, targets: Union[str, Sequence[str]] = ("q", "k", "v", "o"),
                 reflection: str = "orthogonal", dropout: float = 0.0, rank_threshold: float = 0.01):
        if isinstance(targets, str):  # a preset, or one target name
            targets = TARGET_PRESETS.get(targets, [targets])
        self.targets = list(targets)
        self.rank, self.reflection, self.dropout = int(rank), reflection, float(dropout)
        self.rank_threshold = float(rank_threshold)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda name, block, out, inp, layer: HouseholderDelta(
            out, inp, self.rank, self.reflection, self.dropout))

    # ------------------------------------------------------------------ diagnostics

    def diagnostics(self, model: nn.Module) -> List[Dict]:
        """One row per adapted matrix: layer, matrix, |d| summary and the effective rank of the
        H-term (count of |d_i| > rank_threshold · max|d|)."""
        rows = []
        for name, mod in model.named_modules():
            if not isinstance(mod, AdaptedLinear):
                continue
            layer = _layer_index(name)
            kind = next((v for k, v in MATRIX_NAMES.items() if name.endswith(k)), name)
            for block, delta in mod.deltas.items():
                if not isinstance(delta, HouseholderDelta):
                    continue
                d = delta.d.detach().abs().float()
                mx = float(d.max())
                rows.append(dict(layer=layer, matrix=kind if block == "all" else block,
                                 d_abs_min=float(d.min()), d_abs_max=mx, d_abs_mean=float(d.mean()),
                                 effective_rank=int((d > self.rank_threshold * mx).sum()) if mx > 0 else 0,
                                 full_rank=d.numel()))
        return sorted(rows, key=lambda r: (r["layer"], _matrix_order(r["matrix"])))

    def report(self, model: nn.Module, out_dir) -> dict:
        rows = self.diagnostics(model)
        out = {"rank_threshold": self.rank_threshold, "per_matrix": rows}
        if rows and out_dir is not None:
            out["heatmap"] = str(save_rank_heatmap(rows, Path(out_dir) / "householder_rank.png"))
        return out


def _matrix_order(m: str):
    order = ["q", "k", "v", "qkv", "o", "fc1", "fc2"]
    return (order.index(m) if m in order else len(order), m)


def save_rank_heatmap(rows: List[Dict], path: Path) -> Path:
    """Layer × matrix heatmap of the effective rank of the H-term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = sorted({r["matrix"] for r in rows}, key=_matrix_order)
    layers = sorted({r["layer"] for r in rows})
    grid = torch.full((len(layers), len(mats)), float("nan"))
    for r in rows:
        grid[layers.index(r["layer"]), mats.index(r["matrix"])] = r["effective_rank"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(mats), 1.0 + 0.4 * len(layers)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    mid = (float(grid.nan_to_num(0).max()) + float(grid.nan_to_num(1e9).min())) / 2
    for i in range(len(layers)):
        for j in range(len(mats)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, int(grid[i, j]), ha="center", va="center", fontsize=7,
                        color="k" if grid[i, j] > mid else "w")
    ax.set_xticks(range(len(mats)), mats)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    ax.set_title("HTA: effective rank of H(v_l) diag(d) H(v_r)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
