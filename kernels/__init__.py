"""Kernels for the policy math: Future Forcing score, merge neighbour and
attention with a log(mass) bias. Each has a PyTorch reference
(``kernels.reference``), a Triton kernel (``kernels.triton_kernels``) and one
dispatch function (``kernels.dispatch``) that the policies call; see
shared/design/policies.md for the math.
"""
from kernels.dispatch import attention, backend, future_score, merge_neighbour

__all__ = ["future_score", "merge_neighbour", "attention", "backend"]
