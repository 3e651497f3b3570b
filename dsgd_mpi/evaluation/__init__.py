"""Instruments for evaluating a run (DESIGN.md "Evaluation"): calibration and sharpness.

Pure torch and numpy, no MPI: every cross-rank step (summing a calibration
vector, averaging the ranks' softmax, summing Hessian-vector products) is the
caller's reduction, so the MPI trainer and the one-process simulator share this
code. ``calibration`` holds the additive accuracy/NLL/ECE accumulator;
``sharpness`` the Hessian-vector product, Lanczos lambda_max and Hutchinson trace.
"""
