"""Test-wide set-up: import soco first so that its thread settings apply before torch starts; shared tiny data."""

import soco  # noqa: F401
import pytest
import torch

from soco.config.schema import ProposalsConfig
from soco.data.proposals.pipeline import run_proposals
from tests.data.proposals.conftest import make_image_folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(images folder, proposal store) of 12 synthetic 96x72 scenes."""
    root = tmp_path_factory.mktemp("tiny")
    images = make_image_folder(root / "images", 12, size=(96, 72))
    run_proposals(images, root / "store", ProposalsConfig(workers=1), progress=False)
    return images, root / "store"


@pytest.fixture
def one_thread():
    """Run on one torch thread: tiny tensors on shared CPUs wait on other threads far longer than they compute, and the
    golden digests were recorded on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
