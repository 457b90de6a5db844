import json
import os
import socket

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


def strict_loads(text: str):
    """json.loads that rejects NaN and Infinity, as JavaScript's JSON.parse does."""
    def no_constant(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=no_constant)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_module():
    """The built app (``app.App``: its widgets and handlers), as ``python app.py`` builds it."""
    threads = torch.get_num_threads()
    import app
    yield app.build()  # sets torch to one thread (see app.py); the rest of the suite gets its own back
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def server(app_module):
    """One app server for the whole run (a second launch in one process is not supported)."""
    port = free_port()
    app_module.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                      quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app_module.demo.close()
