#!/bin/sh
# One job of `make study`'s pool (nproc jobs at a time): the plans named in PLANS, in order.
#   studies/consensus/run_plans.sh PYTHON "PLANS" RUNS DATA_ROOT [generate's --quick D]
# A simulator plan runs on one thread. After a seed's "_other" plan, whose zhu_lb_ring
# run sets claim 9's perturbation, the same job writes and runs that seed's avg-SAM
# plan, so it starts as soon as its input exists. MPI plans run on $MPIEXEC's ranks;
# `make study` gives them one job, last, so they start beside the last simulator plans
# instead of after them (a core sat idle there). A failed plan does not stop the
# others; the job's status is the last failure's.
py=$1 plans=$2 runs=$3 data=$4
shift 4
status=0
sim() {  # sim N PLAN
    OMP_NUM_THREADS=1 "$py" -m dsgd_mpi.study --sim "$1" "$2" data.root="$data"
}
for plan in $plans; do
    n=${plan##*_n}
    n=${n%%[_.]*}
    case $plan in
    *plan_mpi_n*)
        # unquoted: MPIEXEC may carry options (mpiexec --oversubscribe)
        $MPIEXEC -n "$n" "$py" -m mpi4py -m dsgd_mpi.study "$plan" data.root="$data" || status=$?
        ;;
    *_other.txt)
        seed=${plan##*_s}
        seed=${seed%%_*}
        { sim "$n" "$plan" &&
            "$py" -m studies.consensus.generate "$@" --avg-sam "$runs" --seed "$seed" &&
            sim "$n" "$runs/plan_avgsam_n${n}_s${seed}.txt"; } || status=$?
        ;;
    *)
        sim "$n" "$plan" || status=$?
        ;;
    esac
done
exit $status
