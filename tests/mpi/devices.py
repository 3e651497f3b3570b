"""Run on real ranks: which device each rank gets, chosen as dsgd_mpi.run chooses it.

Usage: python -m mpi4py tests/mpi/devices.py

Before MPI_Init the GPU follows the launcher's local rank (run.bind_gpu); after it,
run.device_and_port picks the device the run trains on. Each rank prints one line:
``device RANK LOCAL_RANK GPUS CURRENT TRAINS_ON``.
"""

import os

import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi import launch, run
from dsgd_mpi.config import load_config

run.bind_gpu(launch.local_rank(os.environ))
world = mpi.init()
local, _ = mpi.node_local(world)
device, _ = run.device_and_port(world, load_config(None, []), lambda message: None)
current = torch.cuda.current_device() if torch.cuda.is_available() else -1
line = (f"device {world.Get_rank()} {local} {torch.cuda.device_count()} {current} "
        f"{device}")  # fmt: skip
for text in world.gather(line, root=0) or []:  # small control data: one line per rank
    print(text, flush=True)
mpi.finalize()
