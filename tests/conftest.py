import os

# Triton kernels (when present) run in the interpreter on CPU; must be set
# before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ffviz.models.tiny import TinyConfig, TinyVideoModel

torch.set_num_threads(1)  # as the CLI: the tiny shapes gain nothing from a second thread


def random_model(**cfg) -> TinyVideoModel:
    """A small model whose zero-initialised layers are randomised too, so that
    every path carries signal (a zero output head would make tests vacuous)."""
    torch.manual_seed(0)
    model = TinyVideoModel(TinyConfig(**{"width": 64, "layers": 2, "heads": 2, **cfg}))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def tiny_random():
    return random_model()
