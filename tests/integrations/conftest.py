"""Fixtures of the sentence-transformers drop-in tests."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.integrations.st_helpers import tiny_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread per test process: pytest -n 2 on 2 cores, never oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> SentenceTransformer:
    return tiny_model()
