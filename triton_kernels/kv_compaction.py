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

# Tiles of the compaction kernel, from an H200 sweep (benchmarks/results/h200-2026-12-04c): the
# kernel copies rows in the widest unit the caches allow (8 bytes for bf16 rows of 128) and one
# program holds all entries x a slice of the row. Up to 32 entries: the whole row, 4 warps; 64-128
# entries: <= 2048 units, 1 warp; more: <= 8192 units, 4 warps. Other choices ran up to 100x
# slower (int16 64 x 64 with 4 warps: 528 us for 40 moves against 4.3 us).
_SMALL_CALL, _MEDIUM_CALL = 32, 128
_MEDIUM_TILE, _LARGE_TILE = 2048, 8192
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
    head strides in copy units of ``unit_bytes`` (the widest of 8/4/2/1 bytes that every address,
    stride and row length is a multiple of). It holds references to the caches so the addresses
    stay valid.
    """

    table: torch.Tensor
    layout: KVLayout
    num_kv_heads: int
    head_size: int
    block_size: int
    elem_bytes: int
    unit_bytes: int = 0   # the kernel copies in units of this many bytes; table strides count units
    caches: list = field(repr=False, default_factory=list)

    @property
    def row_units(self) -> int:
        """Copy units per (token, head) row of K or V."""
        return self.head_size * self.elem_bytes // self.unit_bytes

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
    unit = _copy_unit(rows, elem, shape[3])
    for row in rows:
        row[2:] = [stride * elem // unit for stride in row[2:]]
    table = torch.tensor(rows, dtype=torch.int64, device=device)
    return KVCacheTable(table=table, layout=layout, num_kv_heads=shape[2], head_size=shape[3],
                        block_size=shape[1], elem_bytes=elem, unit_bytes=unit,
                        caches=list(kv_caches))


def _copy_unit(rows: list[list[int]], elem_bytes: int, head_size: int) -> int:
    """Widest copy unit (bytes, a multiple of the element size) dividing every address, every
    stride in bytes and the row length."""
    sizes = [head_size * elem_bytes] + [a for r in rows for a in r[:2]] \
        + [s * elem_bytes for r in rows for s in r[2:]]
    for unit in (8, 4, 2, 1):
        if unit % elem_bytes == 0 and all(x % unit == 0 for x in sizes):
            return unit
    return elem_bytes


def compaction_tile(num_entries: int, row_units: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the compaction kernel for a call of ``num_entries``
    entries over rows of ``row_units`` copy units (see the tile note at the top of the module)."""
    block_t = max(16, triton.next_power_of_2(num_entries))
    row = triton.next_power_of_2(row_units)
    if block_t <= _SMALL_CALL:
        return block_t, row, 4
    if block_t <= _MEDIUM_CALL:
        return block_t, min(row, max(1, _MEDIUM_TILE // block_t)), 1
    return block_t, min(row, max(1, _LARGE_TILE // block_t)), 4


@triton.jit
def _compact_kv_kernel(
    table_ptr, src_ptr, dst_ptr,
    num_entries, block_size,
    NUM_KV_HEADS: tl.constexpr,
    ROW_UNITS: tl.constexpr,   # copy units per (token, head) row
    UNIT_BYTES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    layer = tl.program_id(0)
    which = tl.program_id(1) % 2          # 0: K, 1: V
    head = tl.program_id(1) // 2
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < ROW_UNITS

    row = table_ptr + layer * 5
    addr = tl.load(row + which)
    s_block = tl.load(row + 2)
    s_tok = tl.load(row + 3)
    s_head = tl.load(row + 4)
    if UNIT_BYTES == 1:
        base = addr.to(tl.pointer_type(tl.int8))
    elif UNIT_BYTES == 2:
        base = addr.to(tl.pointer_type(tl.int16))
    elif UNIT_BYTES == 4:
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
    block_t, block_d, warps = compaction_tile(n, table.row_units)
    grid = (table.num_layers, 2 * table.num_kv_heads, triton.cdiv(table.row_units, block_d))
    _compact_kv_kernel[grid](
        table.table, src_slots, dst_slots, n, table.block_size,
        NUM_KV_HEADS=table.num_kv_heads, ROW_UNITS=table.row_units, UNIT_BYTES=table.unit_bytes,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
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
