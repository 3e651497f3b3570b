"""Communication topologies for decentralized SGD (pure numpy, no MPI).

Every quantity here is a pure function of ``(name, n, seed, round t)`` so that
all ranks derive the same graph without talking to each other.  The gossip
layer only needs :meth:`Topology.exchanges` and :meth:`Topology.self_weight`;
the dense matrix and the spectral figures exist for analysis, tests and the
``python -m dsgd_mpi.topology`` command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NAMES: tuple[str, ...] = (
    "complete",
    "ring",
    "torus",
    "exponential",
    "one_peer_exponential",
    "bipartite_exponential",
    "random_matching",
)

# Topologies whose W does not depend on t; the others vary with the round.
_STATIC: frozenset[str] = frozenset({"complete", "ring", "torus", "exponential"})


class TopologyError(ValueError):
    """An unknown topology name or a world size the topology cannot use."""


@dataclass(frozen=True)
class Exchange:
    """One point-to-point step: ``Sendrecv(send_to, recv_from)``.

    Exchanges are listed in the same order on every rank, so that when rank i
    sends to j in exchange m, j receives from i in its own exchange m; a
    blocking Sendrecv per exchange can therefore never deadlock.
    """

    send_to: int
    recv_from: int
    weight: float


RawExchanges = tuple[float, list[tuple[int, int, float]]]


@lru_cache(maxsize=256)
def _matching(n: int, seed: int, t: int) -> tuple[int, ...]:
    """Partner of every rank in the random matching of round t (self = sits out).

    Cached because each rank asks for it once per round and ``matrix`` asks
    n times; the permutation costs O(n) and would otherwise dominate.
    """
    rng = np.random.default_rng([seed, t])
    perm = rng.permutation(n)
    partner = list(range(n))
    # zip stops at the shorter slice, so with odd n the last rank sits out.
    for a, b in zip(perm[0::2], perm[1::2], strict=False):
        partner[int(a)] = int(b)
        partner[int(b)] = int(a)
    return tuple(partner)


def _torus_shape(n: int) -> tuple[int, int]:
    """r x c with r the largest divisor of n not above sqrt(n) (as square as possible)."""
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return r, n // r


@dataclass(frozen=True)
class Topology:
    """A (possibly time-varying) doubly stochastic mixing matrix W(t)."""

    name: str
    n: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise TopologyError(f"unknown topology {self.name!r}; valid names: {', '.join(NAMES)}")
        # bool is an int subclass; Topology("ring", True) is surely a bug.
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)):
            raise TopologyError(f"{self.name} needs an integer n >= 1, got n={self.n!r}")
        if self.n < 1:
            raise TopologyError(f"{self.name} needs n >= 1, got n={self.n}")
        if self.name == "bipartite_exponential" and self.n % 2:
            raise TopologyError(f"bipartite_exponential needs an even n >= 2, got n={self.n}")
        # default_rng rejects negative entropy, so fail early with a clear message.
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TopologyError(f"{self.name} needs an integer seed >= 0, got {self.seed!r}")
        if self.seed < 0:
            raise TopologyError(f"{self.name} needs seed >= 0, got seed={self.seed}")

    # ------------------------------------------------------------------ rounds

    def _check(self, rank: int, t: int) -> None:
        if not 0 <= rank < self.n:
            raise ValueError(f"rank {rank} out of range for {self.name} with n={self.n}")
        if t < 0:
            raise ValueError(f"round t must be >= 0, got t={t}")

    def _raw(self, rank: int, t: int) -> RawExchanges:
        """Self weight and unmerged (send_to, recv_from, weight) list, in pairing order."""
        n, i = self.n, rank
        if n == 1 or self.name == "complete":
            return 1.0, []
        if self.name == "ring":
            if n == 2:
                return 0.5, [(1 - i, 1 - i, 0.5)]
            w = 1.0 / 3.0
            return w, [((i + 1) % n, (i - 1) % n, w), ((i - 1) % n, (i + 1) % n, w)]
        if self.name == "torus":
            r, c = _torus_shape(n)
            row, col = divmod(i, c)

            def at(rr: int, cc: int) -> int:
                return (rr % r) * c + cc % c

            # Fixed shift order (col+1, col-1, row+1, row-1) on every rank keeps
            # the pairing: i sends right in exchange 0 and its right neighbour
            # receives from its left (= i) in exchange 0.
            w = 0.2
            return w, [
                (at(row, col + 1), at(row, col - 1), w),
                (at(row, col - 1), at(row, col + 1), w),
                (at(row + 1, col), at(row - 1, col), w),
                (at(row - 1, col), at(row + 1, col), w),
            ]
        if self.name == "exponential":
            k_max = (n - 1).bit_length() - 1  # floor(log2(n - 1))
            w = 1.0 / (k_max + 2)
            return w, [((i - (1 << k)) % n, (i + (1 << k)) % n, w) for k in range(k_max + 1)]
        if self.name == "one_peer_exponential":
            s = 1 << (t % self._cycle)
            return 0.5, [((i - s) % n, (i + s) % n, 0.5)]
        if self.name == "bipartite_exponential":
            k = 1 + t % self._cycle
            # 2^k - 1 is odd, so odd ranks meet even ranks and never themselves.
            p = (i + (1 << k) - 1) % n if i % 2 else (i - (1 << k) + 1) % n
            return 0.5, [(p, p, 0.5)]
        # random_matching
        p = _matching(n, int(self.seed), t)[i]
        return (1.0, []) if p == i else (0.5, [(p, p, 0.5)])

    def _merged(self, rank: int, t: int) -> tuple[float, tuple[Exchange, ...]]:
        """Merge exchanges that hit the same peer in both directions.

        Every topology here is translation invariant in the shift pattern, so
        the same positions merge on every rank and the pairing survives.
        A shift equal to the identity (e.g. rows of a 1 x c torus) is no
        communication at all: its weight goes to self.
        """
        self._check(rank, t)
        self_w, raw = self._raw(rank, t)
        merged: list[list[float]] = []  # [send, recv, weight]
        for send, recv, w in raw:
            if send == rank and recv == rank:
                self_w += w
                continue
            for m in merged:
                if m[0] == send and m[1] == recv:
                    m[2] += w
                    break
            else:
                merged.append([send, recv, w])
        return self_w, tuple(Exchange(int(s), int(r), float(w)) for s, r, w in merged)

    def exchanges(self, rank: int, t: int) -> tuple[Exchange, ...]:
        """Sendrecv steps for ``rank`` at round ``t``; () for complete (it uses Allreduce)."""
        return self._merged(rank, t)[1]

    def self_weight(self, rank: int, t: int) -> float:
        """Weight of the rank's own vector; 1/n for complete (the Allreduce average)."""
        if self.name == "complete":
            self._check(rank, t)
            return 1.0 / self.n
        return self._merged(rank, t)[0]

    def matrix(self, t: int) -> np.ndarray:
        """Dense W(t) with W[i, j] the weight rank i gives to x_j (float64)."""
        n = self.n
        if self.name == "complete":
            return np.full((n, n), 1.0 / n)
        w = np.zeros((n, n))
        for i in range(n):
            self_w, exs = self._merged(i, t)
            w[i, i] += self_w
            for e in exs:
                w[i, e.recv_from] += e.weight
        return w

    # -------------------------------------------------------------- properties

    @property
    def is_allreduce(self) -> bool:
        return self.name == "complete"

    @property
    def _cycle(self) -> int:
        """Length of the deterministic cycle of W(t); 1 when static or random."""
        if self.n == 1:
            return 1
        if self.name == "one_peer_exponential":
            return (self.n - 1).bit_length()  # ceil(log2 n)
        if self.name == "bipartite_exponential":
            return self.n.bit_length() - 1  # floor(log2 n): floor(log2(n-1)) splits n=4
        return 1

    @property
    def period(self) -> int | None:
        return None if self.name == "random_matching" else self._cycle

    @property
    def time_varying(self) -> bool:
        return self.name == "random_matching" or self._cycle > 1

    @property
    def degree(self) -> int:
        """Max over ranks (and rounds of a period) of distinct peers in one round."""
        if self.n == 1:
            return 0
        if self.name == "complete":
            return self.n - 1
        if self.name == "random_matching":
            return 1
        return max(
            len({p for e in self.exchanges(i, t) for p in (e.send_to, e.recv_from)})
            for t in range(self._cycle)
            for i in range(self.n)
        )

    @property
    def max_exchanges(self) -> int:
        """Most Sendrecv exchanges of one rank in one round (receive buffers to allocate);
        0 for complete, which averages by Allreduce."""
        if self.n == 1 or self.name == "complete":
            return 0
        if self.name == "random_matching":
            return 1
        return max(
            len(self.exchanges(i, t)) for t in range(self._cycle) for i in range(self.n)
        )

    # ---------------------------------------------------------------- spectra

    def rho(self) -> float:
        """Consensus rate 1 - lambda_max(E[(W-J)^T (W-J)]) over one period."""
        n = self.n
        if n == 1 or self.name == "complete":
            return 1.0
        if self.name == "random_matching":
            # E[W] = I/2 + E[P]/2 and W^2 = W for a matching; E[P] is the
            # off-diagonal 1/(n-1) for even n and exactly J for odd n.
            return n / (2.0 * (n - 1)) if n % 2 == 0 else 0.5
        j = np.full((n, n), 1.0 / n)
        acc = np.zeros((n, n))
        for t in range(self._cycle):
            d = self.matrix(t) - j
            acc += d.T @ d
        lam = float(np.linalg.eigvalsh(acc / self._cycle)[-1])
        # Round-off can push lambda_max slightly below 0 or rho above 1.
        return min(1.0, max(0.0, 1.0 - lam))

    def spectral_gap(self) -> float:
        return 1.0 - math.sqrt(max(0.0, 1.0 - self.rho()))

    def lambda2(self) -> float | None:
        """||W - J||_2 for static topologies, None for time-varying ones."""
        if self.time_varying:
            return None
        if self.name == "complete" or self.n == 1:
            return 0.0
        d = self.matrix(0) - np.full((self.n, self.n), 1.0 / self.n)
        return float(np.linalg.norm(d, 2))

    def exact_after(self) -> int | None:
        """Rounds after which prod W(t) == J from every starting phase, or None."""
        n = self.n
        if n == 1:
            return 0
        if self.name == "complete":
            return 1
        if self.name == "random_matching":
            # n == 2 always draws the single matching, which is J.
            return 1 if n == 2 else None
        period = self._cycle
        horizon = 4 * period + 8
        mats = [self.matrix(t) for t in range(period)]
        j = np.full((n, n), 1.0 / n)
        worst = 0
        for t0 in range(period):
            prod = np.eye(n)
            for s in range(1, horizon + 1):
                prod = mats[(t0 + s - 1) % period] @ prod
                if np.allclose(prod, j, rtol=0.0, atol=1e-9):
                    # W J = J for doubly stochastic W, so it stays exact.
                    worst = max(worst, s)
                    break
            else:
                return None
        return worst

    def summary(self) -> dict[str, object]:
        """JSON-able figures of merit."""
        return {
            "name": self.name,
            "n": int(self.n),
            "seed": int(self.seed),
            "rho": self.rho(),
            "spectral_gap": self.spectral_gap(),
            "degree": self.degree,
            "exact_after": self.exact_after(),
            "period": self.period,
            "time_varying": self.time_varying,
            "lambda2": self.lambda2(),
        }


# --------------------------------------------------------------------- CLI


def _format_text(topo: Topology) -> str:
    # Floats rounded so the table stays readable; --json keeps full precision.
    lines = [
        f"{k:<14} {round(v, 6) if isinstance(v, float) else v}" for k, v in topo.summary().items()
    ]
    if topo.n <= 16:
        lines.append("")
        lines.append("W(0):")
        for row in topo.matrix(0):
            lines.append(" ".join(f"{v:6.3f}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.topology",
        description="Show consensus figures of a topology. Names: " + ", ".join(NAMES),
    )
    parser.add_argument("name", help="topology name")
    parser.add_argument("--n", type=int, required=True, help="number of ranks")
    parser.add_argument("--seed", type=int, default=0, help="seed (random_matching)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        topo = Topology(args.name, args.n, args.seed)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(topo.summary()))
    else:
        print(_format_text(topo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
