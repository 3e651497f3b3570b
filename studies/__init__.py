"""Experiments made with dsgd_mpi (not part of the installable package)."""
