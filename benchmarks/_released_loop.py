"""Baseline for bench_dem.py: the released INF-LLaVA DEM math, literally, with a Python loop over windows.

Recombines both maps, cuts each window out of them, runs the shared attention window by window
(q/k/v/out Linears, softmax, residual on the un-projected query, LayerNorm), writes the results back
into two maps, fuses, and reduces with bilinear interpolation. Batched over images only, as released.
It reads the weights of an hrperc ``DualPerspectiveEnhancement`` (released configuration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReleasedLoopDEM(nn.Module):
    def __init__(self, dem) -> None:
        super().__init__()
        self.dem = dem  # weights only: dem.attention.linears / .ln, dem.fusion.ffn_crop / ffn_stride / ln_fuse
        self.heads = dem.heads

    def _attend(self, q_in, kv_in):
        a = self.dem.attention
        b, t, d = q_in.shape
        hd = d // self.heads
        q = a.linears[0](q_in).view(b, t, self.heads, hd).transpose(1, 2)
        k = a.linears[1](kv_in).view(b, -1, self.heads, hd).transpose(1, 2)
        v = a.linears[2](kv_in).view(b, -1, self.heads, hd).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, t, d)
        return a.ln(a.linears[3](o) + q_in)

    def forward(self, local_feats, global_feats, grid):
        gh, gw = grid
        bn, t, d = local_feats.shape
        n = gh * gw
        b = bn // n
        th = tw = int(round(t**0.5))
        loc = local_feats.view(b, n, th, tw, d)
        glo = global_feats.view(b, n, th, tw, d)
        f_loc = local_feats.new_zeros(b, gh * th, gw * tw, d)
        f_glo = local_feats.new_zeros(b, gh * th, gw * tw, d)
        for i in range(gh):
            for j in range(gw):
                f_loc[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw] = loc[:, i * gw + j]
                f_glo[:, i::gh, j::gw] = glo[:, i * gw + j]
        e_glo = torch.zeros_like(f_glo)
        e_loc = torch.zeros_like(f_loc)
        for i in range(gh):
            for j in range(gw):
                cs = (slice(None), slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw))  # contiguous window
                ss = (slice(None), slice(i, None, gh), slice(j, None, gw))  # strided window
                e_glo[cs] = self._attend(f_glo[cs].reshape(b, -1, d), f_loc[cs].reshape(b, -1, d)).view(b, th, tw, d)
                e_loc[ss] = self._attend(f_loc[ss].reshape(b, -1, d), f_glo[ss].reshape(b, -1, d)).view(b, th, tw, d)
        fu = self.dem.fusion
        fused = fu.ln_fuse(torch.cat([fu.ffn_crop(e_loc), fu.ffn_stride(e_glo)], dim=-1) + e_glo + e_loc)
        out = F.interpolate(fused.permute(0, 3, 1, 2).float(), size=(th, tw), mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1).reshape(b, th * tw, d).to(local_feats.dtype)


class FullCrossAttentionDEM(nn.Module):
    """Unwindowed variant: each direction attends over the whole map (SDPA), same weights and fusion."""

    def __init__(self, dem) -> None:
        super().__init__()
        self.dem = dem

    def forward(self, local_feats, global_feats, grid):
        from hrperc.ops.crop import merge

        a, h = self.dem.attention, self.dem.heads
        f_loc = merge(local_feats, grid, "contiguous", layout="nlc")
        f_glo = merge(global_feats, grid, "strided", layout="nlc")
        b, length, d = f_loc.shape

        def attend(q_in, kv_in):
            q, k, v = (
                a.linears[i](x).view(b, length, h, d // h).transpose(1, 2)
                for i, x in ((0, q_in), (1, kv_in), (2, kv_in))
            )
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, d)
            return a.ln(a.linears[3](o) + q_in)

        e_glo, e_loc = attend(f_glo, f_loc), attend(f_loc, f_glo)
        fused = self.dem.fusion(e_loc, e_glo)
        th = int(round(local_feats.shape[1] ** 0.5))
        hw = (grid[0] * th, grid[1] * th)
        out = F.interpolate(
            fused.view(b, *hw, d).permute(0, 3, 1, 2).float(), size=(th, th), mode="bilinear", align_corners=False
        )
        return out.permute(0, 2, 3, 1).reshape(b, th * th, d)
