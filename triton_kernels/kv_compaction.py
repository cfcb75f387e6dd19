"""Accepted-path KV compaction: move K/V entries between slots of paged caches, all layers at once.

After tree verification the accepted nodes' K/V sit at scattered tree slots; the scheduler assumes
the accepted tokens occupy the first slots after the committed prefix. One launch copies, for every
layer, K and V of ``src_slots[i]`` into ``dst_slots[i]`` (flat slot = block_id * block_size +
offset).

Semantics are gather-then-scatter: every source entry is read before any destination is written,
so sources and destinations may overlap (the chain-compaction pattern ``dst[i] <= src[i]``, or any
pattern with unique destinations). Entries with a negative src or dst are skipped (padding).

Supported physical layouts (``layout=``), all with logical per-layer shape
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` unless noted:

* ``"flash"`` -- vLLM 0.26 FlashAttention backend (``FlashAttentionBackend.get_kv_cache_shape``):
  K is ``kv[..., :head_size]``, V is ``kv[..., head_size:]`` (the backend does
  ``kv_cache.transpose(1, 2).split(head_size, -1)``). Physically the runner permutes it with
  ``get_kv_cache_stride_order`` (NHD default: memory order ``[blocks, block_size, heads, 2D]``);
  any strides are handled because the tensor's own strides are used.
* ``"cpu"`` -- vLLM CPU backend (0.26 and 0.32, ``cpu_attn.py``): per (block, head), the
  ``[block_size, 2 * head_size]`` region is read as ``[2 * block_size, head_size]``: the first
  ``block_size`` rows are K, the next ``block_size`` rows are V
  (``kv.view(nb, H, 2 * bs, D).chunk(2, dim=2)``). It is *not* K/V split along the last dim.
* ``"separate"`` -- each layer is a pair ``(k_cache, v_cache)`` of
  ``[num_blocks, block_size, num_kv_heads, head_size]`` tensors (FlashAttention's paged layout).

The kernel copies raw bits (the cache is viewed as an integer type of the same width), so fp8
caches work too. Layers are addressed through an int64 table of (K address, V address, strides),
built once by ``build_kv_cache_table`` and reusable across steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import triton
import triton.language as tl

from .tree_attention import is_triton_interpret

__all__ = [
    "KVCacheTable",
    "KVLayout",
    "build_kv_cache_table",
    "compact_kv_caches",
    "compact_kv_caches_ref",
    "split_kv_cache",
]

KVLayout = Literal["flash", "cpu", "separate"]
KVCacheEntry = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Largest [tokens x head_dim] tile one program holds in registers (elements), with 4 warps;
# calls of more than _TILE_ELEMS entries (up to _MAX_TOKENS) get one column of their head dim
# per program, a tile of up to _MAX_TOKENS elements. 8 warps on an 8192-element int16 tile
# ran 40x slower on an H200 (1.2 ms against 28 us).
_TILE_ELEMS = 4096
_MAX_TOKENS = 8192


def split_kv_cache(kv_cache: KVCacheEntry, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Views one layer's cache as separate K and V tensors (no copy).

    Arguments:
        kv_cache: for ``"flash"``/``"cpu"``, a (num_blocks, num_kv_heads, block_size,
            2 * head_size) tensor as vLLM hands it to the attention backend; for
            ``"separate"``, a pair of (num_blocks, block_size, num_kv_heads, head_size) tensors.
        layout: ``"flash"``, ``"cpu"`` or ``"separate"`` (module docstring).

    Return:
        (k, v): two (num_blocks, block_size, num_kv_heads, head_size) views sharing the cache's
            memory -- FlashAttention's paged layout, usable as ``hybrid_tree_attention`` caches.
    """
    if layout == "separate":
        k, v = kv_cache
        return k, v
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
        raise ValueError("expected one (num_blocks, num_kv_heads, block_size, 2 * head_size) tensor")
    nb, h, bs, two_d = kv_cache.shape
    d = two_d // 2
    if layout == "flash":
        kv = kv_cache.transpose(1, 2)                                  # [nb, bs, H, 2D]
        return kv[..., :d], kv[..., d:]
    if layout == "cpu":
        if kv_cache.stride(3) != 1 or kv_cache.stride(2) != two_d:
            raise ValueError("cpu layout needs each (block, head) region contiguous")
        kv = kv_cache.view(nb, h, 2 * bs, d)
        return kv[:, :, :bs].transpose(1, 2), kv[:, :, bs:].transpose(1, 2)
    raise ValueError(f"unknown KV cache layout {layout!r}")


@dataclass
class KVCacheTable:
    """Device-side description of a list of per-layer paged caches (see ``build_kv_cache_table``).

    ``table`` is int64 (num_layers, 5): K address (bytes), V address (bytes), then block, token and
    head strides in elements. It holds references to the caches so the addresses stay valid.
    """

    table: torch.Tensor
    layout: KVLayout
    num_kv_heads: int
    head_size: int
    block_size: int
    elem_bytes: int
    caches: list = field(repr=False, default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.table.shape[0]


def build_kv_cache_table(kv_caches: Sequence[KVCacheEntry], layout: KVLayout) -> KVCacheTable:
    """Builds the per-layer address table once (host work; reuse it every step).

    Arguments:
        kv_caches: per-layer caches in ``layout`` (see ``split_kv_cache``). All layers must share
            num_kv_heads, block_size, head_size, element size and device; strides may differ.
        layout: ``"flash"``, ``"cpu"`` or ``"separate"``.

    Return:
        KVCacheTable on the caches' device.
    """
    if len(kv_caches) == 0:
        raise ValueError("no KV caches given")
    rows, shape, elem, device = [], None, None, None
    for i, cache in enumerate(kv_caches):
        k, v = split_kv_cache(cache, layout)
        if k.shape != v.shape or k.stride() != v.stride():
            raise ValueError(f"layer {i}: K and V views must have equal shapes and strides")
        if k.stride(-1) != 1:
            raise ValueError(f"layer {i}: head_size dim must be contiguous")
        if shape is None:
            shape, elem, device = k.shape, k.element_size(), k.device
        elif k.shape[1:] != shape[1:] or k.element_size() != elem or k.device != device:
            raise ValueError(f"layer {i}: shape/dtype/device differs from layer 0")
        rows.append([k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2)])
    table = torch.tensor(rows, dtype=torch.int64, device=device)
    return KVCacheTable(table=table, layout=layout, num_kv_heads=shape[2], head_size=shape[3],
                        block_size=shape[1], elem_bytes=elem, caches=list(kv_caches))


@triton.jit
def _compact_kv_kernel(
    table_ptr, src_ptr, dst_ptr,
    num_entries, block_size,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    layer = tl.program_id(0)
    which = tl.program_id(1) % 2          # 0: K, 1: V
    head = tl.program_id(1) // 2
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_SIZE

    row = table_ptr + layer * 5
    addr = tl.load(row + which)
    s_block = tl.load(row + 2)
    s_tok = tl.load(row + 3)
    s_head = tl.load(row + 4)
    if ELEM_BYTES == 1:
        base = addr.to(tl.pointer_type(tl.int8))
    elif ELEM_BYTES == 2:
        base = addr.to(tl.pointer_type(tl.int16))
    elif ELEM_BYTES == 4:
        base = addr.to(tl.pointer_type(tl.int32))
    else:
        base = addr.to(tl.pointer_type(tl.int64))

    t = tl.arange(0, BLOCK_T)
    t_ok = t < num_entries
    src = tl.load(src_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    dst = tl.load(dst_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    ok = t_ok & (src >= 0) & (dst >= 0)
    # The V2 runner's fixed-size calls are mostly (often entirely) skipped entries.
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        src_off = (src // block_size) * s_block + (src % block_size) * s_tok + head * s_head
        dst_off = (dst // block_size) * s_block + (dst % block_size) * s_tok + head * s_head
        m = ok[:, None] & d_ok[None, :]
        x = tl.load(base + src_off[:, None] + d[None, :], mask=m)
        # All reads of this (layer, K/V, head, d-range) slice happen before any write: programs
        # touch disjoint memory, so this makes the whole copy gather-then-scatter.
        tl.debug_barrier()
        tl.store(base + dst_off[:, None] + d[None, :], x, mask=m)


def compact_kv_caches(
    kv_caches: Sequence[KVCacheEntry] | KVCacheTable,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    *,
    layout: KVLayout = "flash",
) -> None:
    """Copies K and V of ``src_slots[i]`` to ``dst_slots[i]`` in every layer, in place, in one
    launch (Triton). Falls back to ``compact_kv_caches_ref`` on CPU (unless
    ``TRITON_INTERPRET=1``) and for more than 8192 entries.

    Arguments:
        kv_caches: per-layer caches in ``layout`` (see ``split_kv_cache``), or a prebuilt
            ``KVCacheTable`` (then ``layout`` is ignored).
        src_slots: (N,), int32/int64, on the caches' device. Flat source slots
            (block_id * block_size + offset, block_size = the cache tensor's block dim). Negative
            entries are skipped.
        dst_slots: (N,), same dtype rules. Flat destination slots; must be unique among the
            non-skipped entries. May overlap ``src_slots`` (gather-then-scatter semantics).
        layout: ``"flash"`` (vLLM 0.26 GPU), ``"cpu"`` (vLLM CPU) or ``"separate"``.

    Return:
        None; the caches are modified in place.
    """
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError("src_slots and dst_slots must be 1-D with equal length")
    n = src_slots.shape[0]
    if n == 0:
        return
    table = kv_caches if isinstance(kv_caches, KVCacheTable) else build_kv_cache_table(
        kv_caches, layout)
    if not (table.table.is_cuda or is_triton_interpret()) or n > _MAX_TOKENS:
        views = [split_kv_cache(c, table.layout) for c in table.caches]
        _compact_views_torch(views, src_slots, dst_slots, table.block_size)
        return
    block_t = max(16, triton.next_power_of_2(n))
    block_d = min(triton.next_power_of_2(table.head_size), max(1, _TILE_ELEMS // block_t))
    grid = (table.num_layers, 2 * table.num_kv_heads, triton.cdiv(table.head_size, block_d))
    _compact_kv_kernel[grid](
        table.table, src_slots, dst_slots, n, table.block_size,
        NUM_KV_HEADS=table.num_kv_heads, HEAD_SIZE=table.head_size, ELEM_BYTES=table.elem_bytes,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )


def _compact_views_torch(views, src_slots, dst_slots, block_size):
    keep = (src_slots >= 0) & (dst_slots >= 0)
    src = src_slots[keep].long()
    dst = dst_slots[keep].long()
    sb, so = src // block_size, src % block_size
    db, do = dst // block_size, dst % block_size
    for k, v in views:
        for x in (k, v):
            vals = x[sb, so].clone()     # gather first ...
            x[db, do] = vals             # ... then scatter


def compact_kv_caches_ref(
    kv_caches: Sequence[KVCacheEntry],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    *,
    layout: KVLayout = "flash",
) -> None:
    """Pure-torch ``compact_kv_caches`` (advanced indexing per layer, gather then scatter).

    Arguments: as in ``compact_kv_caches`` (a list of caches, not a table). Return: None.
    """
    views = [split_kv_cache(c, layout) for c in kv_caches]
    block_size = views[0][0].shape[1]
    _compact_views_torch(views, src_slots, dst_slots, block_size)
