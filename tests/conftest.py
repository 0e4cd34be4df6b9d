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


def threads_fixture(count: int, why: str):
    """A fixture that runs its test on `count` torch threads and restores the number after it."""

    def fixture():
        threads = torch.get_num_threads()
        torch.set_num_threads(count)
        yield
        torch.set_num_threads(threads)

    fixture.__doc__ = f"Run on {count} torch thread(s): {why}"
    return pytest.fixture(fixture)


one_thread = threads_fixture(1, "tiny tensors on shared CPUs wait on other threads far longer than they compute, "
                                "and the golden record was made on one thread.")
two_threads = threads_fixture(2, "reproducibility is promised for a given thread count, and several threads are "
                                 "where kernels can add in a timing-dependent order.")
