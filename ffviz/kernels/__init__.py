"""Kernels for the policy math: Future Forcing score, merge neighbour and
attention with a log(mass) bias. Each has a PyTorch reference
(``reference``), a Triton kernel (``triton_kernels``) and one dispatch function
(``dispatch``) that the policies call; see docs/policies.md for the math. On the
CPU, a whole Future Forcing compression and the cache's merge also have numba
kernels (``cpu_kernels``, used where ``compiled_cpu`` is true), called through
``dispatch`` as well.

The package lives inside ``ffviz`` on purpose: a top-level ``kernels`` would
shadow the PyPI ``kernels`` package that transformers 5 imports.
"""
from ffviz.kernels.dispatch import (attention, backend, compiled_cpu, compiled_cpu_enabled,
                                    future_compress, future_proxies, future_score, merge_apply,
                                    merge_neighbour, subspace_step, warm)

__all__ = ["future_score", "merge_neighbour", "attention", "backend", "compiled_cpu",
           "compiled_cpu_enabled", "future_compress", "future_proxies", "merge_apply",
           "subspace_step", "warm"]
