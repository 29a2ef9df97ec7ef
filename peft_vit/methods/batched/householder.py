"""HTA (methods/householder.py) for every adapted matrix of one shape at once: its parameters in one
:class:`ParamPack`, its factors (:meth:`HouseholderDelta.low_rank` for a batch) in a few ops per
forward."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backbone import layer_index
from ..householder import HouseholderDelta
from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, pack_parameters


def batched_factors(v_l, v_r, d, w_out, w_in, orthogonal: bool = True):
    """:meth:`HouseholderDelta.low_rank` for a batch of matrices at once: parameters with leading
    dims (L, G) -> ``V_in`` (L, G, in, 2+D') and ``V_out`` (L, G, 2+D', out)."""
    k = d.shape[-1]
    c_l = 2.0 / v_l.pow(2).sum(-1, keepdim=True) if orthogonal else 1.0
    c_r = 2.0 / v_r.pow(2).sum(-1, keepdim=True) if orthogonal else 1.0
    vl_k = v_l if v_l.shape[-1] == k else v_l[..., :k]
    vr_k = v_r if v_r.shape[-1] == k else v_r[..., :k]
    dv_l = d * vl_k
    dv_r = d * vr_k
    alpha = (dv_r * vl_k).sum(-1, keepdim=True)
    if v_r.shape[-1] > k:
        dv_l = F.pad(dv_l, (0, v_r.shape[-1] - k))
    if v_l.shape[-1] > k:
        dv_r = F.pad(dv_r, (0, v_l.shape[-1] - k))
    vin = [v_r.unsqueeze(-1), dv_l.unsqueeze(-1)]
    vout = [(c_r * (c_l * alpha * v_l - dv_r)).unsqueeze(-2), (-c_l * v_l).unsqueeze(-2)]
    if w_out is not None:
        vin.append(w_in.mT)
        vout.append(w_out.mT)
    return torch.cat(vin, -1), torch.cat(vout, -2)


class HouseholderBatched(BatchedDeltas):
    """HTA's parameter-side factors of every adapted matrix of one shape (e.g. q, k, v and o of
    all layers) at once, from the :class:`ParamPack` that holds every HTA parameter.

    A unit is L layers × M matrices of one shape; in each layer they belong to the same
    sequence of Linears (``attn.qkv`` with blocks q, k, v, then ``attn.proj``). For a Linear with
    G adapted blocks of NB (q, k, v: NB = 3) the forward is
    ``y = x Wᵀ + b + (x V_in) V_out + diag``: ``V_in`` (in, G·(2+D')) holds the blocks' input
    factors side by side (one input-side matmul), ``V_out`` (G·(2+D'), NB·out) is
    block-diagonal, zero for unadapted blocks, so the update is written over the whole output
    with no slicing; the diagonal terms ``x[:k] ⊙ d`` of all blocks are one product, added to
    the rows they belong to."""

    def __init__(self, pack, units, orthogonal: bool, dropout: float = 0.0):
        # units: [(layers: [[AdaptedLinear, ...] per layer]), ...], every layer the same sequence
        super().__init__([lin for layers in units for lin in zip(*layers) for lin in lin], packs=[pack])
        self.orthogonal = orthogonal
        # adapter dropout: every block draws its own mask, as one HouseholderDelta each would
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.units = []  # per unit: (L, M, [(G, nb, size, whole) per Linear of a layer])
        self.where: List[tuple] = []  # per Linear (in the order given above): (unit, segment)
        for u, layers in enumerate(units):
            segs = []
            for j, lin in enumerate(layers[0]):
                first = _ordered(lin)[0]
                size, k = first.v_l.shape[-1], first.k
                pos = [lin.slices[b][0] // size for b in sorted(lin.deltas, key=lambda b: lin.slices[b][0])]
                nb = lin.out_features // size
                onehot = torch.zeros(len(pos), nb, device=lin.base.weight.device)
                onehot[torch.arange(len(pos)), torch.tensor(pos)] = 1.0
                self.register_buffer(f"onehot_{u}_{j}", onehot[:, None, :, None], persistent=False)
                rows = (torch.tensor(pos).unsqueeze(1) * size + torch.arange(k)).flatten()
                self.register_buffer(f"rows_{u}_{j}", rows.to(lin.base.weight.device), persistent=False)
                segs.append((len(pos), nb, size, len(pos) == nb and k == size and pos == list(range(nb))))
            self.units.append((len(layers), sum(g for g, *_ in segs), segs))
            self.where += [(u, j) for j in range(len(layers[0])) for _ in layers]

    def compute(self) -> List:
        views = self.packs[0].unpack()
        out: List = []
        for u, (L, M, segs) in enumerate(self.units):
            v_l, v_r, d = (views[(u, n)].view(L, M, -1) for n in ("v_l", "v_r", "d"))
            rank = (u, "w_out") in views
            w_out = views[(u, "w_out")].view(L, M, v_l.shape[-1], -1) if rank else None
            w_in = views[(u, "w_in")].view(L, M, -1, v_r.shape[-1]) if rank else None
            vin, vout = batched_factors(v_l, v_r, d, w_out, w_in, self.orthogonal)
            R, sizes = vin.shape[-1], [g for g, *_ in segs]
            parts = zip(*(t.split(sizes, dim) if len(segs) > 1 else (t,)
                          for t, dim in ((vin.transpose(1, 2), 2), (vout, 1), (d, 1))))
            for j, (vin_j, vout_j, d_j) in enumerate(parts):
                G, nb, size, _ = segs[j]
                # (in, G·R) for one matmul; with dropout (G, in, R) for one matmul per block's input
                vin_j = vin_j.reshape(L, -1, G * R) if self.dropout is None else vin_j.permute(0, 2, 1, 3)
                if nb > 1 or G > 1:
                    vout_j = (vout_j.unsqueeze(3) * getattr(self, f"onehot_{u}_{j}")).reshape(L, G * R, nb * size)
                vin_j, vout_j, d_j = self.cast(vin_j, vout_j.reshape(L, G * R, -1), d_j.reshape(L, -1))
                out.extend(zip(vin_j.unbind(0), vout_j.unbind(0), d_j.unbind(0)))
        return out

    def forward_linear(self, lin, index, x):
        vin, vout, d = self._cache[index]
        u, j = self.where[index]
        G, _, _, whole = self.units[u][2][j]
        if x.dtype != vin.dtype:
            vin, vout, d = vin.to(x.dtype), vout.to(x.dtype), d.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        k = d.shape[-1] // G
        if self.dropout is None:
            y = torch.addmm(lin.base(x2), x2 @ vin, vout)  # frozen output + low-rank terms
            xk = x2 if x2.shape[-1] == k else x2[:, :k]
            if G > 1:
                xk = xk.repeat(1, G)
        else:  # (G, N, in): each block's own dropout mask on the adapter input
            xg = self.dropout(x2.expand(G, *x2.shape))
            h = torch.bmm(xg, vin).transpose(0, 1).reshape(x2.shape[0], -1)
            y = torch.addmm(lin.base(x2), h, vout)
            xk = (xg if xg.shape[-1] == k else xg[..., :k]).transpose(0, 1).reshape(x2.shape[0], -1)
        if whole:  # every row of the output has its diagonal term
            y = torch.addcmul(y, xk, d)
        else:
            y = y.index_add(1, getattr(self, f"rows_{u}_{j}"), xk * d)
        return y.view(*x.shape[:-1], y.shape[-1])


def _ordered(lin: AdaptedLinear) -> List[HouseholderDelta]:
    return [lin.deltas[b] for b in sorted(lin.deltas, key=lambda b: lin.slices[b][0])]


def apply(model: nn.Module, method) -> None:
    # one unit per shape of adapted matrix: in every layer the same sequence of Linears
    layers: Dict[tuple, Dict[int, List[AdaptedLinear]]] = {}
    layer_of = layer_index(model)
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear) and all(isinstance(d, HouseholderDelta) for d in mod.deltas.values()):
            first = _ordered(mod)[0]
            key = (first.v_l.shape[-1], first.v_r.shape[-1])
            layers.setdefault(key, {}).setdefault(layer_of(name), []).append(mod)
    units = []
    for by_layer in layers.values():
        seqs = list(by_layer.values())
        sig = [[(list(sorted(m.slices.values())), m.base.weight.shape) for m in seq] for seq in seqs]
        if all(s == sig[0] for s in sig):
            units.append(seqs)
        else:  # layers adapted differently: one unit per Linear
            units += [[[m]] for seq in seqs for m in seq]
    # a Linear's deltas in output-row order, Linears in layer order: contiguous in the pack
    pack = pack_parameters(model, [[d for seq in seqs for lin in seq for d in _ordered(lin)] for seqs in units],
                           name="householder_pack")
    attach_batched(model, "householder_batched",
                   HouseholderBatched(pack, units, method.reflection == "orthogonal", method.dropout))

