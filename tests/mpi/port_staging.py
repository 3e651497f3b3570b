"""Run on real ranks: every collective on tensors gives the same result staged or direct.

Usage: python -m mpi4py tests/mpi/port_staging.py [cuda]

The staged port copies CPU tensors through its host buffers exactly as it
would copy device tensors, so the staging code runs in CI without a GPU. A
staged port with a small chunk reduces whole vectors piece by piece (as the
C-SGD average does on a GPU): same results, to the rounding of MPI's choice
of algorithm per message size.
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from dsgd_mpi.comm import TensorPort, cuda_aware
from dsgd_mpi.group import mean_
from dsgd_mpi.ranks import MpiGroup

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
g = torch.Generator().manual_seed(rank)
x = torch.randn(1037, generator=g)
x64 = torch.randn(33, generator=g, dtype=torch.float64)
everyone = np.stack(comm.allgather(x.numpy()))  # the reference: small control data is fine here
results = {}
for staged in (False, True):
    port = TensorPort("cpu", staged=staged)
    group = MpiGroup(comm, port)
    s = port.allreduce_(comm, x.clone())
    m = port.allreduce_(comm, x.clone(), op="max")
    b = port.bcast_(comm, x.clone(), root=n - 1)
    avg = mean_(group, [x], torch.empty_like(x))
    first = group.first_([x64], torch.empty_like(x64))
    d64 = port.allreduce_(comm, x64.clone())
    # A reused buffer of another size and type must not leak into the next call.
    small = port.allreduce_(comm, torch.ones(5))
    results[staged] = (s, m, b, avg, first, d64, small)
    np.testing.assert_allclose(s.numpy(), everyone.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.numpy(), everyone.max(0))
    np.testing.assert_array_equal(b.numpy(), everyone[n - 1])
    np.testing.assert_allclose(avg.numpy(), everyone.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(small, torch.full((5,), float(n)))
for a, b in zip(results[False], results[True], strict=True):
    assert a.dtype == b.dtype and torch.equal(a, b), "staged and direct results differ"
# Chunks of 100 (1037 = 10 x 100 + 37, and the float64 vector of 33 in one chunk).
chunked = TensorPort("cpu", staged=True, chunk=100)
s = chunked.allreduce_(comm, x.clone())
np.testing.assert_allclose(s.numpy(), results[False][0].numpy(), rtol=1e-6, atol=1e-6)
m = chunked.allreduce_(comm, x.clone(), op="max")
assert torch.equal(m, results[False][1])
ident = chunked.allreduce_(comm, x.clone(), identical=True)
shared = np.stack(comm.allgather(ident.numpy()))
assert (shared == shared[0]).all(), "identical=True: every rank must hold the same bytes"
np.testing.assert_allclose(ident.numpy(), everyone.sum(0), rtol=1e-5, atol=1e-5)
d64 = chunked.allreduce_(comm, x64.clone())
assert torch.equal(d64, results[False][5])
if len(sys.argv) > 1 and sys.argv[1] == "cuda":
    # Device tensors through the staged port (and the direct one where MPI is CUDA-aware):
    # the same bytes as the host path for whole messages; chunks to MPI's rounding.
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    ports = {"staged": TensorPort(dev, staged=True), "chunked": TensorPort(dev, staged=True,
                                                                            chunk=100)}
    if cuda_aware()[0]:
        ports["direct"] = TensorPort(dev, staged=False)
    for name, port in ports.items():
        group = MpiGroup(comm, port)
        got = (port.allreduce_(comm, x.to(dev)), port.allreduce_(comm, x.to(dev), op="max"),
               port.bcast_(comm, x.to(dev), root=n - 1),
               mean_(group, [x.to(dev)], torch.empty_like(x, device=dev)),
               group.first_([x64.to(dev)], torch.empty_like(x64, device=dev)),
               port.allreduce_(comm, x64.to(dev)))  # fmt: skip
        for k, (a, b) in enumerate(zip(results[False][:6], got, strict=True)):
            b = b.cpu()
            if name == "chunked" or k == 3:  # chunks; the mean's division on the device
                np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)
            else:
                assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: differs from host"
    if rank == 0:
        print("device ports ok", sorted(ports))
if rank == 0:
    print("port ok", n)
