"""Block maps and block lists: the selection's output in the forms other block-sparse kernels consume.

The CUDA selection pass emits a bitmap per (batch, head, query block): bit ``kb % 32`` of word ``kb // 32`` set
= key block kb is computed (R and the selected blocks), 32 MiB at 128K tokens with 32 heads and 64x32 blocks
(a full int32 index table would be 1 GiB). Here, in plain PyTorch (any device):

- bitmap <-> bool block map ``[B, H, nQ, nK]``;
- block lists in FlexAttention's ``BlockMask`` convention (``kv_num_blocks [B, H, nQ]``, ``kv_indices
  [B, H, nQ, width]`` ascending), split into blocks that need the causal mask (they reach past the query
  block's first row) and full blocks;
- a FlexAttention computation pass over a block map (exact: the same keys as the CUDA compute pass);
- coarser maps (OR over fq x fk blocks) and map density, for the granularity trade-off of ``sale bench-op``.
"""

from __future__ import annotations

import math

import torch

# rows of [rows, nK] processed at once when building index lists (bounds the transient memory)
_CHUNK_ELEMENTS = 1 << 24


def bits_to_block_map(bits: torch.Tensor, nK: int) -> torch.Tensor:
    """[B, H, nQ, nW] int32 bitmaps -> bool [B, H, nQ, nK] (bit kb % 32 of word kb // 32)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.flatten(-2)[..., :nK].bool()


def block_map_to_bits(block_map: torch.Tensor) -> torch.Tensor:
    """bool [B, H, nQ, nK] -> [B, H, nQ, ceil(nK / 32)] int32 bitmaps (the CUDA selection's format)."""
    nK = block_map.shape[-1]
    padded = torch.nn.functional.pad(block_map.to(torch.int64), (0, (-nK) % 32))
    words = padded.unflatten(-1, (-1, 32))
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=block_map.device),
                                       torch.arange(32, device=block_map.device))
    packed = (words * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def visible_block_map(L: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """bool [nQ, nK]: key blocks causally visible to each query block (Lq == Lk)."""
    nQ, nK = math.ceil(L / block_q), math.ceil(L / block_k)
    last_row = torch.clamp((torch.arange(nQ, device=device) + 1) * block_q, max=L) - 1
    return (torch.arange(nK, device=device)[None, :] * block_k) <= last_row[:, None]


def map_density(block_map: torch.Tensor, L: int, block_q: int, block_k: int) -> torch.Tensor:
    """Computed / causally visible (query block, key block) pairs per head: fp32 [B, H]."""
    vis = visible_block_map(L, block_q, block_k, block_map.device)
    return (block_map & vis).sum(dim=(-1, -2)).float() / vis.sum().float()


def coarsen_block_map(block_map: torch.Tensor, fq: int, fk: int) -> torch.Tensor:
    """OR over fq x fk blocks: bool [B, H, ceil(nQ / fq), ceil(nK / fk)] (a coarser selection granularity)."""
    nQ, nK = block_map.shape[-2:]
    padded = torch.nn.functional.pad(block_map, (0, (-nK) % fk, 0, (-nQ) % fq))
    return padded.unflatten(-1, (-1, fk)).any(-1).unflatten(-2, (-1, fq)).any(-2)


def kv_block_lists(block_map: torch.Tensor, full_width: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, nQ, nK] -> (kv_num_blocks int32 [B, H, nQ], kv_indices int32 [B, H, nQ, width]).

    Indices ascending; width = the largest count (at least 1), or nK with ``full_width`` (what FlexAttention's
    BlockMask expects); entries past a row's count are 0 (unused)."""
    *lead, nK = block_map.shape
    flat = block_map.reshape(-1, nK)
    num = flat.sum(-1, dtype=torch.int32)
    width = nK if full_width else (max(1, int(num.max())) if flat.shape[0] else 1)
    idx = torch.zeros(flat.shape[0], width, dtype=torch.int32, device=block_map.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, nK))
    for r0 in range(0, flat.shape[0], rows):
        chunk = flat[r0:r0 + rows].to(torch.uint8)
        order = torch.sort(chunk, dim=-1, descending=True, stable=True).indices[:, :width]
        idx[r0:r0 + rows] = order.to(torch.int32)
    idx.masked_fill_(torch.arange(width, device=idx.device)[None, :] >= num[:, None], 0)
    return num.reshape(lead), idx.reshape(*lead, width)


def _full_blocks(L: int, block_q: int, block_k: int, device, Lk: int | None = None) -> torch.Tensor:
    """bool [nQ, nK]: key blocks entirely visible to every row of the query block (no causal mask needed).

    ``L`` query rows, the last of ``Lk`` positions (default L; bottom-right causal: row i sees keys <= i + Lk - L)."""
    Lk = L if Lk is None else Lk
    nQ, nK = math.ceil(L / block_q), math.ceil(Lk / block_k)
    last_key = (torch.arange(nK, device=device) + 1) * block_k - 1
    first_row = torch.arange(nQ, device=device) * block_q + (Lk - L)
    return last_key[None, :] <= first_row[:, None]


def flex_block_mask(block_map: torch.Tensor, L: int, block_q: int, block_k: int, Lk: int | None = None):
    """FlexAttention ``BlockMask`` computing exactly the keys of ``block_map`` (causal over ``L`` query rows that
    are the last of ``Lk`` positions, default Lk = L: bottom-right aligned, row i sees keys <= i + Lk - L).

    Blocks wholly below the diagonal are full blocks (no mask_mod); the others carry the causal mask_mod. The
    compiled kernels skip unlisted blocks, so causality is all their mask_mod needs; eager FlexAttention (used
    off CUDA) evaluates the mask_mod everywhere, so there it reads the map as well. FlexAttention takes an index
    list's width as the number of key blocks, so the lists are nK wide: 4 bytes per (head, query block, key
    block) each, 1 GiB per list at 128K tokens, 32 heads and 64x32 blocks (the CUDA compute pass reads the
    32 MiB bitmap instead).
    """
    from torch.nn.attention.flex_attention import BlockMask

    Lk = L if Lk is None else Lk
    off = Lk - L
    full = _full_blocks(L, block_q, block_k, block_map.device, Lk)
    num_full, idx_full = kv_block_lists(block_map & full, full_width=True)
    num_part, idx_part = kv_block_lists(block_map & ~full, full_width=True)
    eager = not block_map.is_cuda

    if off == 0:
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        # a captured 0-d tensor rather than a Python int: one compiled kernel serves every offset (chunks over a
        # growing prefix), not one compilation per chunk
        shift = torch.tensor(off, dtype=torch.int32, device=block_map.device)

        def causal(b, h, q_idx, kv_idx):
            return q_idx + shift >= kv_idx

    def causal_in_map(b, h, q_idx, kv_idx):
        return causal(b, h, q_idx, kv_idx) & block_map[b, h, q_idx // block_q, kv_idx // block_k]

    return BlockMask.from_kv_blocks(num_part, idx_part, num_full, idx_full, BLOCK_SIZE=(block_q, block_k),
                                    mask_mod=causal_in_map if eager else causal, seq_lengths=(L, Lk),
                                    compute_q_blocks=False)


_compiled = {}


def _flex_fn(device_type: str):
    """flex_attention, compiled once per process on CUDA (eager elsewhere: correct but slow)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(flex_attention)
    return _compiled["cuda"]


def flex_block_sparse_attention(q, k, v, block_map, *, block_q: int, block_k: int, scale: float | None = None,
                                return_lse: bool = False):
    """Causal attention over the key blocks of ``block_map`` with FlexAttention (GQA without repeating K/V).

    q: [B, Hq, Lq, d], k/v: [B, Hkv, Lk, d] with Lq <= Lk (the queries are the last Lq positions, bottom-right
    causal); block_map: bool [B, Hq, nQ, nK] at (block_q, block_k), nK of Lk. Returns out, or (out, lse fp32
    [B, Hq, Lq], natural log) with ``return_lse``. Kernel tiles equal the blocks (capped at 128 x 64), so a block is
    never split across a tile boundary."""
    Lq, Lk = q.shape[2], k.shape[2]
    if Lq > Lk:
        raise ValueError(f"FlexAttention pass: Lq={Lq} must not exceed Lk={Lk}")
    mask = flex_block_mask(block_map, Lq, block_q, block_k, Lk)
    options = None
    if q.is_cuda:
        options = {"BLOCK_M": min(block_q, 128), "BLOCK_N": min(block_k, 64)}
    fn = _flex_fn(q.device.type)
    res = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_lse=return_lse,
             kernel_options=options)
    if not return_lse:
        return res
    out, lse = res
    return out, lse.float()
