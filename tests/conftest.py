"""Shared fixtures. Tests never reach the network: the Hugging Face hub runs offline."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Read by huggingface_hub when it is first imported, which happens after this hook.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Tiny models run fastest on one thread, and the in-process servers' device threads do
    # not then compete with torch's intra-op pool on the 2-core CI machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny ESMC (d_model 128, 2 heads of 64, 3 layers) with seeded random weights, eval mode."""
    from helpers.models import random_model

    return random_model()
