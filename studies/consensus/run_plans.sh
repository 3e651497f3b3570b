#!/bin/sh
# One job of `make study`'s pool (nproc jobs at a time): the plans named in PLANS, in order.
#   studies/consensus/run_plans.sh PYTHON "PLANS" DATA_ROOT
# A simulator plan (plan_sim_*) runs on one thread in the fast mode, a reference plan
# (plan_ref_*) on one thread in the reference mode (the MPI ranks' arithmetic), an MPI
# plan (plan_mpi_*) on $MPIEXEC's ranks. `make study` starts the plans in the order of
# plans.txt (generate.py: the longest first, the MPI plan last, beside the last simulator
# plan). A failed plan does not stop the others; the job's status is the last failure's.
py=$1 plans=$2 data=$3
status=0
for plan in $plans; do
    n=${plan##*_n}
    n=${n%%[_.]*}
    case $plan in
    *plan_mpi_n*)
        # unquoted: MPIEXEC may carry options (mpiexec --oversubscribe)
        $MPIEXEC -n "$n" "$py" -m mpi4py -m dsgd_mpi.study "$plan" data.root="$data" || status=$?
        ;;
    *plan_ref_n*)
        OMP_NUM_THREADS=1 "$py" -m dsgd_mpi.study --sim "$n" --mode reference "$plan" \
            data.root="$data" || status=$?
        ;;
    *)
        OMP_NUM_THREADS=1 "$py" -m dsgd_mpi.study --sim "$n" "$plan" data.root="$data" || status=$?
        ;;
    esac
done
exit $status
