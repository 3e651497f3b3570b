"""Reading and summarising run files (HDF5 layout in DESIGN.md); CLI in ``dsgd_mpi.analyze``.

Pure: h5py, numpy, pandas, PyYAML and matplotlib (Agg canvas); no MPI, no torch.
"""

from dsgd_mpi.analysis.load import LoadError, Run, eval_frame, load_run, steps_frame

__all__ = ["LoadError", "Run", "eval_frame", "load_run", "steps_frame"]
