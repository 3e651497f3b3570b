"""MPI benchmarks (``python -m dsgd_mpi.bench gossip|step``), each beside its baseline.

    mpiexec -n 4 python -m mpi4py -m dsgd_mpi.bench gossip --topology ring --numel 270000 --json

``gossip`` times one Gossiper round and, interleaved with it in the same
processes, a bare mpi4py ``Sendrecv`` of the same bytes to the same peers (the
MPI limit here), and reports the ratio. Beside them, the round split in two:
``exchange_s``, the Gossiper's own messages without the arithmetic, and
``mix_s``, the arithmetic without messages (all ranks at once). It also times
the consensus-control overhead: one scalar ``Allreduce`` plus the loop's
bookkeeping, as a fraction of a gossip round. And it times a controlled step
of 5 rounds under each consensus measure (``estimate``, ``exact``: xbar by a
full-vector reduction once per step, ``sketch``: S x in the mixing pass), with
the ratios to the estimate's. Times are per round (per step for the measures),
the slowest rank's, median over blocks.

    mpiexec -n 4 python -m mpi4py -m dsgd_mpi.bench step --model small_cnn --batch 32 --json

``step`` times whole training steps on random inputs: the local update alone,
the update plus one gossip round (D-SGD), and the update plus an all-reduce
average (C-SGD), interleaved in the same processes; it reports the share of a
D-SGD step spent communicating and the C-SGD / D-SGD step-time ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dsgd_mpi import comm as mpi
from dsgd_mpi import mixing
from dsgd_mpi.consensus import MEASURES, Consensus, Measure
from dsgd_mpi.flat import allocate, flatten
from dsgd_mpi.gossip import Gossiper
from dsgd_mpi.launch import threads_for
from dsgd_mpi.ranks import MpiGroup
from dsgd_mpi.replica import Buffers
from dsgd_mpi.schedule import PhaseSpan
from dsgd_mpi.topology import Topology, TopologyError


def _bare_round(comm, topology: Topology, t: int, x, recv) -> None:
    """What MPI alone costs: the same bytes to the same peers, no arithmetic."""
    if topology.is_allreduce:
        _HOST.allreduce_(comm, recv[0].copy_(x))
        return
    for k, e in enumerate(topology.exchanges(comm.Get_rank(), t)):
        mpi.sendrecv(comm, x.numpy(), e.send_to, recv[k].numpy(), e.recv_from, tag=k)


_HOST = mpi.TensorPort("cpu", staged=False)


def _timed(comm, reducer: mpi.Reducer, fn, rounds: int) -> float:
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    if torch.cuda.is_available():  # device work must be done before the clock stops
        torch.cuda.synchronize()
    return float(reducer.max([(time.perf_counter() - start) / rounds])[0])


def bench_gossip(
    comm, topology: Topology, numel: int, rounds: int, blocks: int, chunk: int
) -> dict:
    rng = torch.Generator().manual_seed(comm.Get_rank())

    def data() -> torch.Tensor:
        # Real values in every buffer: a zeroed numpy array is the kernel's
        # shared zero page until written, which reads from cache and would
        # flatter whoever reads it.
        return allocate(numel).normal_(generator=rng)

    peers = max(1, topology.degree)
    gossiper = Gossiper(comm, topology, data(), port=_HOST, chunk=chunk)
    # The Gossiper's own messages without the arithmetic, and the arithmetic
    # without messages (every rank at once, as in a round): what each part costs.
    split = not topology.is_allreduce and topology.n > 1
    schedule = Gossiper(comm, topology, data(), port=_HOST, chunk=chunk) if split else None
    mix_x, mix_d, mix_recv = data(), data(), [data() for _ in range(peers)]
    mix_weights = [1.0 / (peers + 1)] * peers
    bare_x, bare_recv = data(), [data() for _ in range(peers)]
    reducer = mpi.Reducer(comm)
    state = {"t": 0}

    def bare() -> None:
        _bare_round(comm, topology, state["t"], bare_x, bare_recv)
        state["t"] += 1

    def mix() -> None:
        mixing.mix(mix_x, mix_recv, mix_weights, mix_d)

    def control() -> None:
        # What consensus control adds to a round: the scalar reduction and the
        # comparison with the target.
        estimate = reducer.sum([1.0])[0] / topology.n
        _ = estimate <= 0.5

    fns = {"gossip": gossiper.round, "bare": bare, "mix": mix, "control": control}
    if schedule is not None:
        fns["exchange"] = schedule.exchange
    group = MpiGroup(comm, _HOST, chunk)
    steps = {name: _controlled_step(group, topology, data(), name) for name in MEASURES}
    fns.update({f"step_{name}": step for name, (step, _) in steps.items()})
    for fn in fns.values():  # warm up buffers, connections, compiled kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):  # interleave so that machine noise hits all alike
        for name, fn in fns.items():
            times[name].append(_timed(comm, reducer, fn, rounds))
    med = {name: statistics.median(v) for name, v in times.items()}
    gossip_s, bare_s, control_s = med["gossip"], med["bare"], med["control"]
    for g in (gossiper, schedule, *(c.mixer for _, c in steps.values())):
        if g is not None:
            g.close()
    per_step = {name: med[f"step_{name}"] for name in MEASURES}
    return {
        "bench": "gossip",
        "topology": topology.name,
        "n": topology.n,
        "numel": numel,
        "chunk": chunk,
        "rounds": rounds,
        "blocks": blocks,
        "gossip_s": gossip_s,
        "bare_sendrecv_s": bare_s,
        "ratio": gossip_s / bare_s if bare_s > 0 else float("nan"),
        "exchange_s": med.get("exchange"),
        "mix_s": med["mix"],
        "control_s": control_s,
        "control_over_round": control_s / gossip_s if gossip_s > 0 else float("nan"),
        "bytes_per_round": gossiper.bytes_last_round,
        # what was timed, counted by the objects themselves (warm-up included)
        "gossip_rounds_run": gossiper.t, "bare_rounds_run": state["t"],
        "step_rounds": STEP_ROUNDS,
        **{f"step_{name}_s": per_step[name] for name in MEASURES},
        **{f"{name}_over_estimate": per_step[name] / per_step["estimate"]
           for name in MEASURES if name != "estimate"},  # fmt: skip
        "mpi": mpi.library_version(),
    }


#: Rounds of the controlled step timed per measure.
STEP_ROUNDS = 5
_FIVE = PhaseSpan(0, 0.0, 1.0, "constant", 1.0, 0.0, None, STEP_ROUNDS, 0.9)


def _controlled_step(group: MpiGroup, topology: Topology, flat: torch.Tensor, measure: str):
    """One communication step of a controlled phase whose target is never met: 5 rounds."""
    buffers = Buffers([flat])
    consensus = Consensus(group, buffers, topology, Measure(measure, group, buffers))
    state = {"step": 0}

    def step() -> None:
        consensus.communicate(_FIVE, target=-1.0, step=state["step"])
        state["step"] += 1

    return step, consensus


MODEL_INPUTS = {"small_cnn": (1, 28), "mlp": (1, 28), "resnet20": (3, 32)}


def bench_step(
    comm, topology: Topology, model_name: str, batch: int, steps: int, blocks: int,
    device: torch.device | None = None,
) -> dict:  # fmt: skip
    from dsgd_mpi.models import build_model  # torchvision import: only for this benchmark

    rank, n = comm.Get_rank(), comm.Get_size()
    channels, size = MODEL_INPUTS[model_name]
    torch.manual_seed(0)
    device = device or torch.device("cpu")
    model = build_model(model_name, num_classes=10, in_channels=channels, width=1,
                        image_size=size).to(device)  # fmt: skip
    flat, _ = flatten(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(batch, channels, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    port = _HOST
    if device.type != "cpu":
        port = mpi.TensorPort(device, staged=not mpi.cuda_aware()[0])
    gossiper = Gossiper(comm, topology, flat, port=port)
    averager = Gossiper(comm, Topology("complete", n), flat, port=port)
    reducer = mpi.Reducer(comm)

    def update() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def dsgd() -> None:
        update()
        reducer.sum(gossiper.round())  # the consensus estimate, as the trainer does

    def csgd() -> None:
        update()
        averager.round()

    for fn in (update, dsgd, csgd):  # warm up
        fn()
    u, d, c = [], [], []
    for _ in range(blocks):
        u.append(_timed(comm, reducer, update, steps))
        d.append(_timed(comm, reducer, dsgd, steps))
        c.append(_timed(comm, reducer, csgd, steps))
    update_s, dsgd_s, csgd_s = (statistics.median(v) for v in (u, d, c))
    return {
        "bench": "step",
        "model": model_name,
        "params": flat.numel(),
        "topology": topology.name,
        "n": n,
        "batch_per_rank": batch,
        "steps": steps,
        "blocks": blocks,
        "update_s": update_s,
        "dsgd_step_s": dsgd_s,
        "csgd_step_s": csgd_s,
        "dsgd_comm_share": max(0.0, dsgd_s - update_s) / dsgd_s,
        "csgd_over_dsgd": csgd_s / dsgd_s,
        # what was timed, counted by the gossipers themselves (warm-up included)
        "gossip_rounds_run": gossiper.t, "averages_run": averager.t,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_buffers": "host" if device.type == "cpu" else
                          ("staged" if port.staged else "direct"),  # fmt: skip
        "mpi": mpi.library_version(),
    }


def run_gossip(args) -> int:
    comm = mpi.WORLD
    if args.numel <= 0:
        return _fail(comm, f"--numel must be positive, got {args.numel}")
    if args.chunk <= 0:
        return _fail(comm, f"--chunk must be positive, got {args.chunk}")
    try:
        topology = Topology(args.topology, comm.Get_size(), seed=args.seed)
    except TopologyError as exc:
        return _fail(comm, str(exc))
    torch.set_num_threads(1)
    rounds = args.rounds or max(5, min(200, 50_000_000 // args.numel))
    result = bench_gossip(comm, topology, args.numel, rounds, args.blocks, args.chunk)
    _report(comm, result, args.json)
    return 0


def run_step(args) -> int:
    comm = mpi.WORLD
    for name in ("batch", "steps", "blocks"):
        if getattr(args, name) <= 0:
            return _fail(comm, f"--{name} must be positive, got {getattr(args, name)}")
    try:
        topology = Topology(args.topology, comm.Get_size(), seed=args.seed)
    except TopologyError as exc:
        return _fail(comm, str(exc))
    torch.set_num_threads(threads_for(os.environ, mpi.node_affinities(comm))[0])
    local_rank, _ = mpi.node_local(comm)
    gpus = torch.cuda.device_count()
    device = torch.device(f"cuda:{local_rank % gpus}") if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    result = bench_step(comm, topology, args.model, args.batch, args.steps, args.blocks, device)
    _report(comm, result, args.json)
    return 0


def _report(comm, result: dict, as_json: bool) -> None:
    if comm.Get_rank() == 0:
        if as_json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:>20}: {value}")


def _fail(comm, message: str) -> int:
    if comm.Get_rank() == 0:
        print(f"dsgd_mpi.bench: {message}", file=sys.stderr)
    return 2

