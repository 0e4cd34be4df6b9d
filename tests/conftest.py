"""Test-wide set-up: import soco first so that its thread settings apply before torch starts; shared tiny data."""

import soco  # noqa: F401
import pytest

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
