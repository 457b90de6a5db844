"""Kernels for the policy math: Future Forcing score, merge neighbour and
attention with a log(mass) bias. Each has a PyTorch reference
(``kernels.reference``), a Triton kernel (``kernels.triton_kernels``) and one
dispatch function (``kernels.dispatch``) that the policies call; see
shared/design/policies.md for the math. On the CPU, a whole Future Forcing
compression and the cache's merge also have numba kernels (``kernels.cpu_kernels``,
used where ``compiled_cpu`` is true).
"""
from kernels import cpu_kernels
from kernels.dispatch import (attention, backend, compiled_cpu, compiled_cpu_enabled, future_score,
                              merge_neighbour)

__all__ = ["future_score", "merge_neighbour", "attention", "backend", "compiled_cpu",
           "compiled_cpu_enabled", "cpu_kernels"]
