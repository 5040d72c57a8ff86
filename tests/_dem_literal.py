"""A literal, per-window, plain-torch implementation of the released INF-LLaVA DEM, written from docs/released.md.

Deliberately naive (Python loops over windows, maps materialised) so it is obviously the spec; the
parity tests compare hrperc's DEM with it. Weights come as a released-layout state dict (no prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ln(x, sd, name, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _attention(q_in, kv_in, sd, heads):
    """Released attention on one window: LN(out(softmax(q k^T / sqrt(hd)) v) + q_in); (T, D) -> (T, D)."""
    t, d = q_in.shape
    hd = d // heads
    q = _lin(q_in, sd, "attention.linears.0").view(t, heads, hd).transpose(0, 1)
    k = _lin(kv_in, sd, "attention.linears.1").view(-1, heads, hd).transpose(0, 1)
    v = _lin(kv_in, sd, "attention.linears.2").view(-1, heads, hd).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    o = (p @ v).transpose(0, 1).reshape(t, d)
    return _ln(_lin(o, sd, "attention.linears.3") + q_in, sd, "attention.ln")


def released_dem(local_feats, global_feats, grid, sd, heads, pairing="released", out_hw=None):
    """(B*N, ht*wt, D) x2 -> (B, ht*wt, D), literally as released (or with the paper's pairing)."""
    gh, gw = grid
    bn, t, d = local_feats.shape
    n, b = gh * gw, bn // (gh * gw)
    th = tw = int(round(t**0.5))
    H, W = gh * th, gw * tw
    f_loc = torch.zeros(b, H, W, d, dtype=local_feats.dtype)
    f_glo = torch.zeros(b, H, W, d, dtype=local_feats.dtype)
    for bi in range(b):
        for i in range(gh):
            for j in range(gw):
                k = i * gw + j
                f_loc[bi, i * th : (i + 1) * th, j * tw : (j + 1) * tw] = local_feats[bi * n + k].view(th, tw, d)
                f_glo[bi, i::gh, j::gw] = global_feats[bi * n + k].view(th, tw, d)

    def windows(kind):
        if kind == "contiguous":
            return [(slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw)) for i in range(gh) for j in range(gw)]
        return [(slice(i, None, gh), slice(j, None, gw)) for i in range(gh) for j in range(gw)]

    w_glo, w_loc = ("contiguous", "strided") if pairing == "released" else ("strided", "contiguous")
    e_glo = torch.zeros_like(f_glo)
    e_loc = torch.zeros_like(f_loc)
    for bi in range(b):
        for rs, cs in windows(w_glo):
            q_in = f_glo[bi, rs, cs].reshape(-1, d)
            kv_in = f_loc[bi, rs, cs].reshape(-1, d)
            e_glo[bi, rs, cs] = _attention(q_in, kv_in, sd, heads).view(th, tw, d)
        for rs, cs in windows(w_loc):
            q_in = f_loc[bi, rs, cs].reshape(-1, d)
            kv_in = f_glo[bi, rs, cs].reshape(-1, d)
            e_loc[bi, rs, cs] = _attention(q_in, kv_in, sd, heads).view(th, tw, d)
    ffn_l = _lin(F.gelu(_lin(e_loc, sd, "ffn_crop.0")), sd, "ffn_crop.2")
    ffn_g = _lin(F.gelu(_lin(e_glo, sd, "ffn_stride.0")), sd, "ffn_stride.2")
    fused = _ln(torch.cat([ffn_l, ffn_g], dim=-1) + e_glo + e_loc, sd, "ln_fuse")
    size = out_hw or (th, tw)
    out = F.interpolate(fused.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, -1, d).to(local_feats.dtype)
