"""The Method redesign changed no result: a soco_tiny run ends with bitwise the weights of the code before it.

The digests were recorded with the code of commit ee487fd (SoCo built into the engine) on the same
tiny data, seed 0, 4 steps, one torch thread (the float sums of a kernel depend on its thread count),
before the redesign. Two review fixes change SoCo's results on purpose and
are set back here: the level thresholds (now scaled with the view size) and the blur kernel (now
covering 3 sigma).
"""

import hashlib

import pytest
import torch

from soco.config.loading import load_config
from soco.config.schema import ProposalsConfig
from soco.data import views
from soco.data.proposals.pipeline import run_proposals
from soco.engine.trainer import pretrain

BEFORE_THE_REDESIGN = {
    "online": "e8da296736056b1025673bddeaf26e0c0b14d6fd5973f710bedf017c96c42ed9",
    "predictor": "09c17c9a55f104ddbbee337a8499328e1bde682eb27624b45d93d824925decb1",
    "target": "062beac7341abb589807fe5971f43ffb0d68a67c9db46cb9bb8eee622727c3fc",
}
FINAL_LOSS_BEFORE = 8.140235900878906


def digest(state: dict) -> str:
    """SHA-256 of a state dict's names and raw tensor bytes, in name order."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(name.encode())
        hasher.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    return hasher.hexdigest()


@pytest.fixture(scope="module")
def rich_store(tiny_data, tmp_path_factory):
    """The tiny images' proposals by the `rich` algorithm: the `fast` set of the recording's time."""
    images, _ = tiny_data
    store = tmp_path_factory.mktemp("rich") / "store"
    run_proposals(images, store, ProposalsConfig(workers=1, algorithm="rich"), progress=False)
    return store


def test_soco_tiny_with_the_old_thresholds_and_blur_gives_bitwise_the_old_weights(tiny_data, rich_store, tmp_path,
                                                                                  one_thread, monkeypatch):
    images, store = tiny_data[0], rich_store
    # the digests were recorded with torchvision's colour kernels (OpenCV's equal them only to rounding)
    monkeypatch.setattr(views, "COLOR_BACKEND", "torchvision")
    config = load_config("soco_tiny", ["train.device=cpu", "train.steps=4", "train.seed=0",
                                       "train.precision=fp32", "train.channels_last=false",  # as recorded
                                       "method.model.level_thresholds=[48,96,192]", "method.views.blur_kernel=tenth"])
    pretrain(config, tmp_path / "run", images, store, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    method_state = state["method_state"]

    def part(prefix):
        return {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}

    assert digest(state["encoder"]) == BEFORE_THE_REDESIGN["online"]
    assert digest(part("online.")) == BEFORE_THE_REDESIGN["online"]
    assert digest(part("predictor.")) == BEFORE_THE_REDESIGN["predictor"]
    assert digest(part("target.")) == BEFORE_THE_REDESIGN["target"]
    assert state["loss"] == FINAL_LOSS_BEFORE
