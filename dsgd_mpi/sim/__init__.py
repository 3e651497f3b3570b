"""One-process simulation: the same run with N replicas in one process (DESIGN.md).

    python -m dsgd_mpi.sim configs/quickstart.yaml --workers 16 [key.path=value ...]

The pure parts of a run (config, topology W(t), schedule, data shards,
targets, measures, metrics file, analysis) and the training loop itself are the
MPI run's; only the moving of bytes differs (:class:`SimGroup`). Two modes:

- ``reference``: the replicas are stepped one after the other with the MPI
  ranks' own arithmetic (the same mixing kernel on the same chunks, one torch
  thread), so a run reproduces the MPI run of the same config bit for bit in
  everything computed locally; values that go through an MPI reduction (the
  estimate, the exact distance, an all-reduce average, evaluation of x̄) agree
  to float rounding, since MPI sums in its own order.
- ``fast``: the N forward/backward passes batched over stacked parameters
  (:mod:`dsgd_mpi.sim.fast`), and the mixing done on the stack.
"""
