"""Performance figures, each measured beside its baseline in one process tree (ratios).

``gossip`` and ``step`` run on MPI ranks (:mod:`dsgd_mpi.bench.mpi`); ``sim``
launches the one-process simulation and the MPI run of one config itself
(:mod:`dsgd_mpi.bench.sim`), so its own process never initializes MPI.
"""
