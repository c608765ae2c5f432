"""Tile sizes and launch parameters of the attention kernels.

Every Pallas kernel of :mod:`kernels` is parameterised by a :class:`KernelConfig`
(``block_q`` query rows and ``block_k`` key rows per tile, Triton ``num_warps`` and
``num_stages``). :class:`AttentionConfig` groups one ``KernelConfig`` per kernel:

============  ==========================================================  =========================
field         kernel                                                      grid / loop
============  ==========================================================  =========================
fwd           plain flash forward: o and the row log-sum-exp              grid over q blocks, loop k
bwd_kv        plain backward: dk, dv                                      grid over k blocks, loop q
bwd_q         plain backward: dq                                          grid over q blocks, loop k
jvp_fwd       fused forward + tangent: o, t_o, lse, mu                    grid over q blocks, loop k
jvp_bwd_kv    tangent backward: dk, dv, dtk, dtv                          grid over k blocks, loop q
jvp_bwd_q     tangent backward: dq, dtq                                   grid over q blocks, loop k
fwd_qkv       plain forward of a qkv projection read in place, its        grid over q blocks, loop k
              prologue (bias, q/k norms) applied to each tile it loads
jvp_bwd_v     tangent backward under ``jvp_bwd_impl="matmul"``: dv, dtv,  grid over k blocks, loop q
              and dS, dtS written out
============  ==========================================================  =========================

A field left ``None`` takes the default for the (padded) head dimension from
:func:`default_config`. Block sizes must be powers of two >= 16 (Triton's ``tl.dot``
needs every matmul dimension >= 16). Inside :func:`kernels.attention` each block size is
additionally clamped to ``max(16, next_power_of_2(seq_len))`` so that short sequences are
not padded to a large block; the sequence is then zero-padded to a multiple of the
largest block size the current mode can use (nothing is padded when already aligned).

``num_warps``/``num_stages`` are passed to ``plgpu.CompilerParams``; they do nothing in
interpret mode.

How the first defaults were chosen (no GPU was available): every kernel was lowered for CUDA
(Pallas -> Triton IR) for a grid of configs (block_q, block_k in 16..128, 4/8 warps,
2/3 stages) at D=64 and D=128, and the IR compiled offline for sm_90a with pip Triton 3.9
and its ptxas, recording registers, spills and shared memory. Findings (Triton 3.9; the
Triton inside XLA may differ somewhat):

* registers, not shared memory, bound the tangent kernels: Pallas cannot pass an
  accumulator into ``tl.dot``, so every ``acc + dot(a, b)`` keeps the dot result in extra
  registers; with D=128 only small tiles of jvp_bwd_kv / jvp_bwd_q compile spill-free;
* 4 warps spill for most 128-row tiles; 8 warps are needed at D=128;
* a tile whose MMA M dimension (block_q in q-grid kernels, block_k in k-grid kernels) is
  below 64 compiles to ``mma.sync`` (MMAv2) instead of Hopper ``wgmma``.

Those were the largest wgmma tiles without (or with little) spilling. Measured on an H200,
the sweep (``bench/attention.py --sweep``, candidates per head dim in its ``SWEEP``) replaced
them for 2-byte inputs at head dims 64 and 128; at 64 it preferred 64-row tiles on 4 warps
(one warpgroup) for the tangent kernels, which the register count alone did not predict.

One more field is a choice, not tiles: ``jvp_bwd_impl`` says how the tangent backward runs.
``"kernels"``: ``jvp_bwd_kv`` and ``jvp_bwd_q``, each recomputing the probabilities, the tangent
logits and dP, 21 S^2 D matmul units in all. ``"matmul"``: one kernel, ``jvp_bwd_v``, computes
them once per (key block, query block), accumulates dv and dtv, and writes dS and dtS (rounded to
the input dtype, as the kernels round them before their matmuls); dq, dtq, dk and dtk are then
batched XLA matmuls of those (cuBLAS on a GPU; four: dtS meets [k | tk] and [q | tq] as one matmul
of twice the width each): 15 units, 6 of them at cuBLAS's rate. The price is
2 * B * H * Sk * Sq elements of transient memory, so this backward is not linear in the sequence
length. ``"auto"`` (the default at head dim 128 for 2-byte inputs) takes ``"matmul"`` where it
measured faster and its memory stays bounded: both lengths at least ``JVP_BWD_AUTO_MIN_SEQ`` tokens
and dS plus dtS at most ``JVP_BWD_AUTO_MAX_BYTES`` per device (:func:`jvp_bwd_impl_choice`).
Measured on an H200 (``bench/NOTES.md`` item 40): at head dim 128 faster from 2,048 to 8,192
tokens and slower at 1,024; slower at head dim 64 (256 and 1,024 tokens), so head dims 16 to 64
keep ``"kernels"``, as do 256 and 4-byte inputs (not measured under ``"matmul"``).
"""
from __future__ import annotations

import numpy as np

import dataclasses
from typing import Optional

_VALID_WARPS = (1, 2, 4, 8, 16)
KERNEL_NAMES = ("fwd", "bwd_kv", "bwd_q", "jvp_fwd", "jvp_bwd_kv", "jvp_bwd_q", "fwd_qkv", "jvp_bwd_v")
JVP_BWD_IMPLS = ("kernels", "matmul", "auto")
JVP_BWD_AUTO_MIN_SEQ = 2048
JVP_BWD_AUTO_MAX_BYTES = 2 << 30  # 2 GiB of dS and dtS per device
MAX_HEAD_DIM = 256
MIN_BLOCK = 16


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (x >= 1)."""
    return 1 << (int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel (see module docstring)."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if not _is_pow2(val) or val < MIN_BLOCK:
                raise ValueError(
                    f"KernelConfig.{name} must be a power of two >= {MIN_BLOCK}, got {val!r}"
                )
        if self.num_warps not in _VALID_WARPS:
            raise ValueError(f"KernelConfig.num_warps must be one of {_VALID_WARPS}, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"KernelConfig.num_stages must be an int in [1, 8], got {self.num_stages!r}")

    def clamp(self, q_len: int, kv_len: int) -> "KernelConfig":
        """Shrinks the blocks so that no block is larger than the (pow2-rounded) sequence."""
        bq = min(self.block_q, max(MIN_BLOCK, next_pow2(q_len)))
        bk = min(self.block_k, max(MIN_BLOCK, next_pow2(kv_len)))
        return dataclasses.replace(self, block_q=bq, block_k=bk)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One :class:`KernelConfig` per kernel; ``None`` = default for the head dim."""

    fwd: Optional[KernelConfig] = None
    bwd_kv: Optional[KernelConfig] = None
    bwd_q: Optional[KernelConfig] = None
    jvp_fwd: Optional[KernelConfig] = None
    jvp_bwd_kv: Optional[KernelConfig] = None
    jvp_bwd_q: Optional[KernelConfig] = None
    fwd_qkv: Optional[KernelConfig] = None
    jvp_bwd_v: Optional[KernelConfig] = None
    jvp_bwd_impl: Optional[str] = None  # "kernels" | "matmul" | "auto" (module docstring); None = default

    def __post_init__(self):
        for name in KERNEL_NAMES:
            val = getattr(self, name)
            if val is not None and not isinstance(val, KernelConfig):
                raise ValueError(
                    f"AttentionConfig.{name} must be a KernelConfig or None, got {type(val).__name__}"
                )
        if self.jvp_bwd_impl is not None and self.jvp_bwd_impl not in JVP_BWD_IMPLS:
            raise ValueError(f"AttentionConfig.jvp_bwd_impl must be one of {JVP_BWD_IMPLS} or None, "
                             f"got {self.jvp_bwd_impl!r}")

    @classmethod
    def uniform(cls, block_q: int, block_k: int, num_warps: int = 4, num_stages: int = 2) -> "AttentionConfig":
        """Same tiles for every kernel (handy in tests)."""
        kc = KernelConfig(block_q, block_k, num_warps, num_stages)
        return cls(**{name: kc for name in KERNEL_NAMES})

    def resolve(self, head_dim: int, dtype=None) -> "AttentionConfig":
        """Fills every ``None`` field with the default for ``head_dim`` (and input ``dtype``)."""
        default = default_config(head_dim, dtype)
        return AttentionConfig(
            **{name: getattr(self, name) or getattr(default, name) for name in KERNEL_NAMES},
            jvp_bwd_impl=self.jvp_bwd_impl or default.jvp_bwd_impl,
        )

    def clamp(self, q_len: int, kv_len: int) -> "AttentionConfig":
        return AttentionConfig(
            **{name: getattr(self, name).clamp(q_len, kv_len) for name in KERNEL_NAMES},
            jvp_bwd_impl=self.jvp_bwd_impl,
        )

    def to_dict(self) -> dict:
        d = {
            name: (None if getattr(self, name) is None else getattr(self, name).to_dict())
            for name in KERNEL_NAMES
        }
        d["jvp_bwd_impl"] = self.jvp_bwd_impl
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionConfig":
        fields = KERNEL_NAMES + ("jvp_bwd_impl",)
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown AttentionConfig fields {sorted(unknown)}; expected {fields}")
        return cls(**{k: (v if k == "jvp_bwd_impl" or v is None else KernelConfig(**v)) for k, v in d.items()})


def _kc(bq, bk, w, s):
    return KernelConfig(block_q=bq, block_k=bk, num_warps=w, num_stages=s)


# Defaults per padded head dim (16/32/64 share one set). Head dims 64 and 128 (2-byte inputs):
# the winners of ``bench/attention.py --sweep`` on an H200 (see bench/NOTES.md). Head dim 256
# and the 4-byte tiles below: from an offline compile of the kernels for sm_90a (Pallas ->
# TTIR here, then Triton 3.9 + ptxas on the CPU; see "How the defaults were chosen" above):
# the largest tiles that compile without (or with only a few bytes of) register spills and fit
# in shared memory.
_DEFAULTS = {
    64: AttentionConfig(  # `bench/attention.py --sweep` at (32, 18, 256, 64) and (32, 18, 1024, 64) on an
        # H200 (bench/results/attention_sweep_h200_hd64.json), merged per kernel (smallest summed
        # slowdown vs each shape's best): fwd+tangent+bwd 1.30 -> 0.52 ms and 14.9 -> 5.5 ms. The
        # tangent kernels want 4 warps at this head dim (8 warps ran them 1.5-3x slower).
        fwd=_kc(64, 64, 4, 3),
        bwd_kv=_kc(64, 64, 4, 2),
        bwd_q=_kc(128, 64, 8, 3),
        jvp_fwd=_kc(64, 64, 4, 3),
        jvp_bwd_kv=_kc(32, 64, 4, 2),
        jvp_bwd_q=_kc(64, 64, 4, 2),
        fwd_qkv=_kc(256, 64, 8, 3),  # bench/qkv_prologue.py: the best summed time over the DiT's shapes
        jvp_bwd_v=_kc(32, 64, 4, 2),  # jvp_bwd_kv's tiles; "matmul" lost at this head dim (item 40)
        jvp_bwd_impl="kernels",
    ),
    128: AttentionConfig(  # the best of `bench/attention.py --sweep` at (1, 24, 4096, 128) on an H200
        fwd=_kc(128, 64, 8, 3),  # (bench/results/attention_sweep_h200.json): 24.1 -> 8.7 ms fwd+tangent+bwd
        bwd_kv=_kc(32, 128, 8, 3),
        bwd_q=_kc(128, 32, 8, 2),
        jvp_fwd=_kc(128, 64, 8, 2),
        jvp_bwd_kv=_kc(64, 32, 8, 3),
        jvp_bwd_q=_kc(128, 32, 8, 3),
        fwd_qkv=_kc(128, 64, 8, 3),  # the plain forward's tiles
        jvp_bwd_v=_kc(32, 128, 8, 2),  # bench/results/attention_sweep_h200_jvp_bwd_matmul.json
        jvp_bwd_impl="auto",
    ),
    256: AttentionConfig(
        fwd=_kc(64, 32, 8, 2),
        bwd_kv=_kc(16, 64, 8, 2),
        bwd_q=_kc(64, 16, 8, 2),
        jvp_fwd=_kc(32, 32, 8, 2),
        jvp_bwd_kv=_kc(16, 32, 8, 2),
        jvp_bwd_q=_kc(32, 16, 8, 2),
        fwd_qkv=_kc(64, 32, 8, 2),  # the plain forward's tiles
        jvp_bwd_v=_kc(16, 32, 8, 2),  # jvp_bwd_kv's tiles (not measured under "matmul")
        jvp_bwd_impl="kernels",
    ),
}


def padded_head_dim(head_dim: int) -> int:
    """Head dim the kernels run at: next power of two, at least 16."""
    return max(MIN_BLOCK, next_pow2(head_dim))


# fp32 inputs take twice the shared memory per tile: at head dim 128 the H200-tuned tiles above
# exceed the 227 KiB per block, so 4-byte inputs keep the smaller, compile-checked tiles (at
# head dim 64: the offline-chosen tiles used before the head-dim-64 sweep, which passed the
# native fp32 tests on the H100 and H200).
_DEFAULTS_4BYTE = {
    64: AttentionConfig(
        fwd=_kc(128, 64, 4, 3),
        bwd_kv=_kc(64, 128, 8, 2),
        bwd_q=_kc(128, 64, 8, 2),
        jvp_fwd=_kc(64, 64, 8, 3),
        jvp_bwd_kv=_kc(32, 64, 8, 2),
        jvp_bwd_q=_kc(128, 32, 8, 2),
        fwd_qkv=_kc(128, 64, 4, 3),  # the plain forward's tiles
        jvp_bwd_v=_kc(32, 64, 8, 2),  # jvp_bwd_kv's tiles (not measured under "matmul")
        jvp_bwd_impl="kernels",
    ),
    128: AttentionConfig(
        fwd=_kc(128, 64, 8, 3),
        bwd_kv=_kc(32, 128, 8, 2),
        bwd_q=_kc(128, 64, 8, 2),
        jvp_fwd=_kc(64, 64, 8, 2),
        jvp_bwd_kv=_kc(32, 64, 8, 2),
        jvp_bwd_q=_kc(64, 32, 8, 2),
        fwd_qkv=_kc(64, 64, 8, 2),  # (128, 64, 8, 3) asked for 257 KiB of shared memory on an H200
        jvp_bwd_v=_kc(32, 64, 8, 2),  # jvp_bwd_kv's tiles (not measured under "matmul")
        jvp_bwd_impl="kernels",
    ),
}


def default_config(head_dim: int, dtype=None) -> AttentionConfig:
    """Default :class:`AttentionConfig` for a head dim (1..256; uses the padded dim) and input
    dtype (None: 2-byte inputs)."""
    if not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be an int in [1, {MAX_HEAD_DIM}], got {head_dim!r}")
    dp = max(64, padded_head_dim(head_dim))
    if dtype is not None and np.dtype(dtype).itemsize >= 4 and dp in _DEFAULTS_4BYTE:
        return _DEFAULTS_4BYTE[dp]
    return _DEFAULTS[dp]


def jvp_bwd_impl_choice(choice: str, batch: int, heads: int, q_len: int, kv_len: int, itemsize: int) -> str:
    """What ``jvp_bwd_impl`` runs for one call: ``"kernels"`` or ``"matmul"``; ``"auto"`` resolves to
    ``"matmul"`` when both (padded) lengths are at least ``JVP_BWD_AUTO_MIN_SEQ`` and dS and dtS,
    ``2 * batch * heads * q_len * kv_len * itemsize`` bytes, fit in ``JVP_BWD_AUTO_MAX_BYTES``."""
    if choice not in JVP_BWD_IMPLS:
        raise ValueError(f"jvp_bwd_impl must be one of {JVP_BWD_IMPLS}, got {choice!r}")
    if choice != "auto":
        return choice
    ds_bytes = 2 * batch * heads * q_len * kv_len * itemsize
    fits = min(q_len, kv_len) >= JVP_BWD_AUTO_MIN_SEQ and ds_bytes <= JVP_BWD_AUTO_MAX_BYTES
    return "matmul" if fits else "kernels"
