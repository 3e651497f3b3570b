#!/bin/sh
# One simulator plan of the study, on one thread; `make study` runs one per core.
# After a seed's "_other" plan, whose zhu_lb_ring run sets claim 9's perturbation,
# the same job writes and runs that seed's avg-SAM plan: it then starts as soon as
# its input exists instead of after every plan (which left a core idle at the end).
#   studies/consensus/sim_plan.sh PYTHON PLAN RUNS DATA_ROOT [generate's --quick D]
set -e
py=$1 plan=$2 runs=$3 data=$4
shift 4
n=${plan##*_n}
n=${n%%_*}
OMP_NUM_THREADS=1 "$py" -m dsgd_mpi.study --sim "$n" "$plan" data.root="$data"
case $plan in
*_other.txt)
    seed=${plan##*_s}
    seed=${seed%%_*}
    "$py" -m studies.consensus.generate "$@" --avg-sam "$runs" --seed "$seed"
    OMP_NUM_THREADS=1 "$py" -m dsgd_mpi.study --sim "$n" "$runs/plan_avgsam_n${n}_s${seed}.txt" \
        data.root="$data"
    ;;
esac
