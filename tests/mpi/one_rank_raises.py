"""Rank 1 raises while the others enter a collective: the job must die, not hang."""

from mpi4py import MPI

comm = MPI.COMM_WORLD
if comm.Get_rank() == 1:
    raise RuntimeError("deliberate failure on rank 1")
comm.Barrier()
