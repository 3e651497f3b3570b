"""The mixing arithmetic of one gossip round, fused into one pass over the chunk.

For received neighbour chunks ``r_k`` with weights ``w_k`` (``ws = sum_k w_k``)::

    d = sum_k w_k r_k - ws x;   x += d;   estimate = ||d||^2

and, in the same pass, what ``consensus.measure`` needs beyond the estimate:

- ``exact``: given the chunk of ``xbar`` (the replicas' average, fixed for the
  round), ``distance = ||x_new - xbar||^2``;
- ``sketch``: ``S x_new`` added into k float64 buckets (the CountSketch of
  :mod:`dsgd_mpi.sketch`, hashes computed inline from the global index).

As separate torch calls the plain round is five passes over memory and most of
a gossip round's cost beyond MPI's own copy (measured: 0.23 ms per 256 Ki-float
chunk with two peers, against 0.045 ms for the fused numba loop, one core).
numba compiles the loops to vectorized float32 code; ``fastmath`` lets it
reorder the sums into SIMD lanes. The sums are float64 (float32 running sums
over a chunk lose digits: 1.8e-7 relative on 2^20 squares, see the tests);
converting the squares costs nothing measurable because the loop is
memory-bound. Measured per 256 Ki-float chunk, one thread, medians of 41
interleaved repetitions on the shared 2-core EPYC (thread CPU time):
estimate with float64 sums / the previous float32 kernel = 0.97-1.04 over
8 runs (1 and 2 peers); ``exact`` (one more stream to read) = 1.35x the
estimate pass with 2 peers; ``sketch`` = 2.1-2.4x with k = 1024 .. 65536
(the read-modify-write of the buckets dominates; a per-element hash with a
scattered add was 8.6x).

One kernel source serves every case: numba compiles a separate specialization
per argument type and prunes ``if a is None`` branches, so the 1-peer, 2-peer
and more-peer forms (beyond two peers the rest are first folded into the
scratch buffer) with and without ``xbar`` are as tight as hand-written loops.
Indices are unsigned because numba's wraparound check for a possibly negative
signed index keeps LLVM from vectorizing.

Without numba (or on GPU) :func:`mix_torch` computes the same, with the same
hash in int64 torch arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from dsgd_mpi import sketch as cs

try:  # numba is a dependency, but the torch path keeps a platform without wheels working
    import numba

    _jit = numba.njit(nogil=True, fastmath=True, cache=True)
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None


#: 256 Ki floats (1 MiB per buffer). Measured on a 2-core EPYC (512 KiB L2 per
#: core, 32 MiB L3), 4 ranks, ring, 11M floats: 64 Ki pieces were ~15 % slower
#: than 256 Ki, 8-16 Ki pieces 2-3x slower (per-message cost); 256 Ki pieces
#: still fit the shared L3 beside the peers' pieces.
DEFAULT_CHUNK = 1 << 18


def chunk_bounds(numel: int, measured: int, chunk: int) -> list[tuple[int, int, bool]]:
    """(start, stop, measured) of the chunks of a buffer, in the order every rank walks them.

    The measured part and the rest are chunked separately, so no chunk mixes
    the two, into near-equal pieces of at most ``chunk`` elements: a 270k buffer
    in 256k chunks would otherwise pay a whole extra round trip for an 8k tail.
    """
    out = []
    for lo, hi, flag in ((0, measured, True), (measured, numel, False)):
        size = hi - lo
        if size <= 0:
            continue
        pieces = -(-size // max(1, chunk))
        step = -(-size // pieces)
        out += [(s, min(s + step, hi), flag) for s in range(lo, hi, step)]
    return out



class SketchSink(NamedTuple):
    """Where a mixing pass adds ``S x_new``: buckets, the chunk's global offset, the seed.

    ``s`` is float64 of length k (numpy for :func:`mix_numpy`, a tensor on x's
    device for :func:`mix_torch`); a plain ``(s, offset, seed)`` tuple does as well.
    """

    s: np.ndarray | torch.Tensor
    offset: int
    seed: int


#: Elements mixed before their sketch is added: the slice is still in L1.
_SKETCH_SPAN = 2048


if numba is not None:
    _U = np.uint64
    _GOLDEN, _MIX1, _MIX2 = _U(cs.GOLDEN), _U(cs.MIX1), _U(cs.MIX2)
    _BLOCK, _BITS = cs.BLOCK, cs.BLOCK_BITS

    @_jit
    def _finalize(z):  # pragma: no cover - compiled
        z = (z ^ (z >> _U(30))) * _MIX1
        z = (z ^ (z >> _U(27))) * _MIX2
        return z ^ (z >> _U(31))

    @_jit
    def _block_hashes(key, b):  # pragma: no cover - compiled
        # splitmix64 outputs 2b + 1 and 2b + 2 from state `key` (sketch.block_hashes).
        z1 = _finalize(key + (_U(2) * b + _U(1)) * _GOLDEN)
        z2 = _finalize(key + (_U(2) * b + _U(2)) * _GOLDEN)
        return z1, z2

    @_jit
    def _buckets_signs(index, k, key):  # pragma: no cover - compiled
        """The kernels' hash, element by element: for tests against the reference."""
        buckets = np.empty(index.size, np.int64)
        signs = np.empty(index.size, np.float64)
        for i in range(index.size):
            g = _U(index[i])
            lane = g & _U(_BLOCK - 1)
            z1, z2 = _block_hashes(key, g >> _U(_BITS))
            start = ((z1 >> _U(32)) * _U(k)) >> _U(32)
            buckets[i] = np.int64((start + lane) % _U(k))
            signs[i] = -1.0 if (z2 >> lane) & _U(1) else 1.0
        return buckets, signs

    @_jit
    def _mix_span(x, r0, r1, p, w0, w1, ws, xbar, lo, hi):  # pragma: no cover - compiled
        # r1 / p / xbar may be None: numba compiles one loop per combination.
        acc = 0.0
        dist = 0.0
        for i in range(_U(lo), _U(hi)):
            d = w0 * r0[i] - ws * x[i]
            if r1 is not None:
                d += w1 * r1[i]
            if p is not None:
                d += p[i]
            xn = x[i] + d
            x[i] = xn
            dd = np.float64(d)
            acc += dd * dd
            if xbar is not None:
                e = np.float64(xn - xbar[i])
                dist += e * e
        return acc, dist

    @_jit
    def _sketch_span(s, x, lo, hi, offset, key):  # pragma: no cover - compiled
        # Adds sign(g) x[i] to s[bucket(g)], g = offset + i, block by block: each
        # block's lanes go to consecutive buckets, cut where they wrap around k.
        k = s.size
        i = lo
        while i < hi:
            g = offset + i
            lane = g & (_BLOCK - 1)
            count = min(_BLOCK - lane, hi - i)
            z1, z2 = _block_hashes(key, _U(g >> _BITS))
            pos = np.int64(((z1 >> _U(32)) * _U(k)) >> _U(32)) + lane
            while pos >= k:  # once at most when k >= 64; no division
                pos -= k
            if count == _BLOCK and pos + _BLOCK <= k:
                # The common case, a whole block without wrap: a fixed trip count
                # that LLVM unrolls into a few wide adds.
                src, dst = _U(i), _U(pos)
                for t in range(_U(0), _U(_BLOCK)):
                    v = np.float64(x[src + t])
                    s[dst + t] += -v if (z2 >> t) & _U(1) else v
            else:
                j = 0
                while j < count:
                    seg = min(count - j, k - pos)
                    bits = z2 >> _U(lane + j)
                    src, dst = _U(i + j), _U(pos)
                    for t in range(_U(0), _U(seg)):
                        v = np.float64(x[src + t])
                        s[dst + t] += -v if (bits >> t) & _U(1) else v
                    j += seg
                    pos = 0
            i += count

    @_jit
    def _mix(x, r0, r1, p, w0, w1, ws, xbar):  # pragma: no cover - compiled
        return _mix_span(x, r0, r1, p, w0, w1, ws, xbar, 0, x.size)

    @_jit
    def _mix_sketch(x, r0, r1, p, w0, w1, ws, xbar, s, offset, key):  # pragma: no cover
        # Mix a span, then sketch it while it is in L1: still one trip to memory.
        acc = 0.0
        dist = 0.0
        for lo in range(0, x.size, _SKETCH_SPAN):
            hi = min(lo + _SKETCH_SPAN, x.size)
            a, e = _mix_span(x, r0, r1, p, w0, w1, ws, xbar, lo, hi)
            acc += a
            dist += e
            _sketch_span(s, x, lo, hi, offset, key)
        return acc, dist

    @_jit
    def _axpy(d, r, w):  # pragma: no cover - compiled
        for i in range(d.size):
            d[i] += w * r[i]


def mix_numpy(
    x: np.ndarray,
    received: Sequence[np.ndarray],
    weights: Sequence[float],
    scratch: np.ndarray,
    *,
    xbar: np.ndarray | None = None,
    sketch: SketchSink | tuple | None = None,
) -> tuple[float, float]:
    """One round on a float32 chunk in place: ``x += sum_k w_k r_k - (sum_k w_k) x``.

    Returns ``(||d||^2, ||x_new - xbar||^2)``; the second is 0.0 without
    ``xbar``. With ``sketch = (s, offset, seed)``, ``S x_new`` is added into
    ``s`` (x[0] being element ``offset`` of the whole buffer). ``scratch`` (x's
    size) is used beyond two peers. The CPU hot path: no torch calls.
    """
    if numba is None:
        t = torch.from_numpy
        sk = None if sketch is None else (t(sketch[0]), sketch[1], sketch[2])
        return mix_torch(t(x), [t(r) for r in received], weights, t(scratch),
                         xbar=None if xbar is None else t(xbar), sketch=sk)  # fmt: skip
    f = np.float32
    if not received:  # a rank that sits a round out still measures
        received, weights = [x], [0.0]
    ws = f(sum(weights))
    r0, w0 = received[0], f(weights[0])
    r1, w1, p = None, f(0.0), None
    if len(received) >= 2:
        r1, w1 = received[1], f(weights[1])
    if len(received) >= 3:  # torus, exponential: fold the rest into scratch, then one pass
        p = scratch
        np.multiply(received[2], f(weights[2]), out=p)
        for r, w in zip(received[3:], weights[3:], strict=True):
            _axpy(p, r, f(w))
    if sketch is None:
        acc, dist = _mix(x, r0, r1, p, w0, w1, ws, xbar)
    else:
        s, offset, seed = sketch
        if s.dtype != np.float64 or not 1 <= s.size <= cs.MAX_BUCKETS:
            raise ValueError("sketch buckets must be float64, 1 <= k < 2^31")
        key = np.uint64(cs.key_of(seed))
        acc, dist = _mix_sketch(x, r0, r1, p, w0, w1, ws, xbar, s, int(offset), key)
    return float(acc), float(dist)


def _int64(u: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _srl(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _finalize_torch(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps mod 2^64 like uint64: the same bits.
    z = (z ^ _srl(z, 30)) * _int64(cs.MIX1)
    z = (z ^ _srl(z, 27)) * _int64(cs.MIX2)
    return z ^ _srl(z, 31)


def buckets_signs_torch(
    index: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`CountSketch.buckets_signs` in int64 torch ops on index's device.

    Returns int64 buckets and float64 signs (+-1).
    """
    g = index.to(torch.int64)
    lane = g & (_BLOCK - 1)
    b = g >> cs.BLOCK_BITS
    key, golden = _int64(cs.key_of(seed)), _int64(cs.GOLDEN)
    z1 = _finalize_torch(key + (2 * b + 1) * golden)
    z2 = _finalize_torch(key + (2 * b + 2) * golden)
    start = (_srl(z1, 32) * k) >> 32  # < 2^32 * 2^31: no overflow
    buckets = (start + lane) % k
    signs = 1.0 - 2.0 * ((z2 >> lane) & 1).to(torch.float64)
    return buckets, signs


#: Elements hashed at once by :func:`mix_torch`: bounds its int64 temporaries.
_TORCH_SKETCH_PIECE = 1 << 20


def mix_torch(
    x: torch.Tensor,
    received: Sequence[torch.Tensor],
    weights: Sequence[float],
    scratch: torch.Tensor,
    *,
    xbar: torch.Tensor | None = None,
    sketch: SketchSink | tuple | None = None,
) -> tuple[float, float]:
    """:func:`mix_numpy` in torch (any device): the same results to float rounding.

    ``scratch`` (x's size) holds ``d``; the sketch buckets ``s`` are a float64
    tensor on x's device.
    """
    acc = torch.zeros(2, dtype=torch.float64, device=x.device)
    mix_torch_into(acc, x, received, weights, scratch, xbar=xbar, sketch=sketch)
    estimate, distance = acc.tolist()
    return estimate, distance


def mix_torch_into(
    acc: torch.Tensor,
    x: torch.Tensor,
    received: Sequence[torch.Tensor],
    weights: Sequence[float],
    scratch: torch.Tensor,
    *,
    xbar: torch.Tensor | None = None,
    sketch: SketchSink | tuple | None = None,
) -> None:
    """:func:`mix_torch` adding ``||d||^2`` and the distance into ``acc`` (float64, 2) on the
    device: no host synchronisation, so a GPU pipeline keeps going."""
    d = scratch
    if received:
        torch.mul(received[0], weights[0], out=d)
        for r, w in zip(received[1:], weights[1:], strict=True):
            d.add_(r, alpha=w)
        d.add_(x, alpha=-sum(weights))
    else:
        d.zero_()
    x.add_(d)
    acc[0] += torch.linalg.vector_norm(d, dtype=torch.float64) ** 2
    if xbar is not None:
        torch.sub(x, xbar, out=d)
        acc[1] += torch.linalg.vector_norm(d, dtype=torch.float64) ** 2
    if sketch is not None:
        s, offset, seed = sketch
        for lo in range(0, x.numel(), _TORCH_SKETCH_PIECE):
            piece = x[lo : lo + _TORCH_SKETCH_PIECE]
            start = int(offset) + lo
            index = torch.arange(start, start + piece.numel(), device=x.device)
            buckets, signs = buckets_signs_torch(index, s.numel(), seed)
            s.index_add_(0, buckets, signs * piece.to(torch.float64))


def mix(
    x: torch.Tensor,
    received: Sequence[torch.Tensor],
    weights: Sequence[float],
    scratch: torch.Tensor,
    *,
    xbar: torch.Tensor | None = None,
    sketch: SketchSink | tuple | None = None,
) -> tuple[float, float]:
    """Tensors in, the fastest kernel out: numba for CPU tensors, else :func:`mix_torch`."""
    if numba is None or x.device.type != "cpu":
        return mix_torch(x, received, weights, scratch, xbar=xbar, sketch=sketch)
    sk = None if sketch is None else (sketch[0].numpy(), sketch[1], sketch[2])
    return mix_numpy(x.numpy(), [r.numpy() for r in received], weights, scratch.numpy(),
                     xbar=None if xbar is None else xbar.numpy(), sketch=sk)  # fmt: skip
