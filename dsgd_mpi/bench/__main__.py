"""python -m dsgd_mpi.bench gossip|step|sim|flush [options] --json"""

from __future__ import annotations

import argparse

from dsgd_mpi.mixing import DEFAULT_CHUNK
from dsgd_mpi.topology import NAMES

MODELS = ("mlp", "resnet20", "small_cnn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.bench", description="Performance figures beside their baselines."
    )
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gossip", help="a Gossiper round vs bare Sendrecv; a step per measure")
    g.add_argument("--topology", default="ring", help=f"one of {', '.join(NAMES)}")
    g.add_argument("--numel", type=int, default=270_000, help="floats in the buffer")
    g.add_argument("--rounds", type=int, default=0, help="rounds per block (0: auto from numel)")
    g.add_argument("--blocks", type=int, default=7)
    g.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="floats per chunk")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    st = sub.add_parser("step", help="training step: update alone, + gossip (D-SGD), + all-reduce")
    st.add_argument("--model", default="small_cnn", choices=MODELS)
    st.add_argument("--batch", type=int, default=32, help="samples per rank")
    st.add_argument("--topology", default="ring", help=f"one of {', '.join(NAMES)}")
    st.add_argument("--steps", type=int, default=10, help="steps per block")
    st.add_argument("--blocks", type=int, default=5)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    fl = sub.add_parser("flush", help="metrics flush time at a short and a long run file")
    fl.add_argument("--sizes", default="1000,100000", help="step rows of the two files")
    fl.add_argument("--flushes", type=int, default=40, help="flushes of each file")
    fl.add_argument("--rows", type=int, default=1, help="step rows per flush")
    fl.add_argument("--dir", default=None, help="where the files go (default: $TMPDIR)")
    fl.add_argument("--json", action="store_true", help="print one JSON object")
    sm = sub.add_parser("sim", help="the simulation vs the MPI run of one config, whole runs")
    sm.add_argument("config", help="YAML config")
    sm.add_argument("overrides", nargs="*", help="dotted key=value overrides for both")
    sm.add_argument("--workers", type=int, default=16, help="world size of the comparison")
    sm.add_argument("--mode", choices=("fast", "reference"), default="fast")
    sm.add_argument("--repeats", type=int, default=3, help="interleaved pairs")
    sm.add_argument("--scaling", default="4,16,64", help="simulation alone at these N ('' none)")
    sm.add_argument("--json", action="store_true", help="print one JSON object")
    # Overrides may follow the options (`sim CONFIG --workers 16 run.epochs=1`): argparse
    # cannot intermix positionals with subparsers, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if args.what == "sim" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.what == "sim":
        from dsgd_mpi.bench.sim import run_sim

        return run_sim(args)
    if args.what == "flush":
        from dsgd_mpi.bench.flush import run_flush

        return run_flush(args)
    from dsgd_mpi.bench import mpi

    return mpi.run_gossip(args) if args.what == "gossip" else mpi.run_step(args)


if __name__ == "__main__":
    raise SystemExit(main())
