"""What an evaluation measures: the averaged model, the local models, their ensemble,
calibration and sharpness. Collectives go through a :class:`~dsgd_mpi.group.Group`,
so the same code runs on MPI ranks and in the one-process simulator."""
