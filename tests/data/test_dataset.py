"""The pretraining data set through a method's transform (SoCo's here): reproducible across worker counts,
unreadable images skipped and counted, other images readable by a transform."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from soco.data.dataset import BatchCollate, ImageDataset, SampleSource, SkippedSample, sample_seed
from soco.data.batch_drawing import draw_views
from soco.data.image_files import file_fingerprint
from soco.data.proposals.store import FAILED_LEVEL, ImageRecord, ProposalStore, write_store
from soco.errors import DataError, ProposalStoreError
from soco.methods.soco_transform import SoCoTransform
from soco.methods.soco_transform import SoCoViewsConfig as ViewsConfig

SMALL_VIEWS = ViewsConfig(v1_size=48, v2_size=48, v3_size=24, proposals_per_image=3)
SIZES = [(64, 80), (96, 64), (72, 72), (80, 96)]
collate_views = BatchCollate(SoCoTransform(SMALL_VIEWS))


def SoCoDataset(images, store, views, seed=0, check_images=True):  # noqa: N802 - reads like the old class
    """The generic data set with SoCo's transform."""
    return ImageDataset(images, store, SoCoTransform(views), seed=seed, check_images=check_images)


def write_images(root: Path) -> list[str]:
    """Four small PNGs with coloured rectangles, and a failed entry's garbage file."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for number, (width, height) in enumerate(SIZES):
        rng = np.random.default_rng(number)
        pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        pixels[height // 4 : height // 2, width // 5 : width // 2] = rng.integers(100, 255, size=3)
        name = f"img_{number}.png"
        Image.fromarray(pixels).save(root / name)
        names.append(name)
    return names


def build_store(images: Path, store_folder: Path, with_failure: bool = False) -> ProposalStore:
    """A store whose records match the folder's files, three boxes per image."""
    records = []
    for number, (width, height) in enumerate(SIZES):
        data = (images / f"img_{number}.png").read_bytes()
        boxes = np.array(
            [[0, 0, width / 2, height / 2], [width / 4, height / 4, width, height], [5, 10, width - 5, height - 2]],
            dtype=np.float32,
        )
        records.append(ImageRecord(f"img_{number}.png", file_fingerprint(data), len(data), width, height, 0, 9, boxes))
    if with_failure:
        data = b"not an image at all"
        (images / "broken.png").write_bytes(data)
        records.append(
            ImageRecord("broken.png", file_fingerprint(data), len(data), 0, 0, FAILED_LEVEL, 0,
                        np.zeros((0, 4), np.float32), "not an image file")
        )
    write_store(store_folder, records, {"algorithm": "fast", "images_root": str(images)})
    return ProposalStore(store_folder)


@pytest.fixture
def folder_and_store(tmp_path):
    images = tmp_path / "images"
    write_images(images)
    store = build_store(images, tmp_path / "store", with_failure=True)
    return images, store


def batches(dataset, workers: int, batch_size: int = 2) -> list[dict]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_views)
    return list(loader)


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a["paths"] == b["paths"] and a["skipped"] == b["skipped"]
        assert torch.equal(a["indices"], b["indices"])
        assert list(a["box_ids"]) == list(b["box_ids"]) and all(torch.equal(a["box_ids"][k], b["box_ids"][k])
                                                                for k in a["box_ids"])
        for x, y in zip([*a["views"].values(), *a["boxes"].values()], [*b["views"].values(), *b["boxes"].values()]):
            assert torch.equal(x, y)


def test_batches_are_identical_with_zero_and_two_workers(folder_and_store):
    images, store = folder_and_store
    dataset = SoCoDataset(images, store, SMALL_VIEWS, seed=3)
    assert len(dataset) == 4  # the failed entry of the store is not indexed
    dataset.set_epoch(1)
    in_process = batches(dataset, workers=0)
    with_workers = batches(dataset, workers=2)
    assert_same_batches(in_process, with_workers)
    batch = in_process[0]
    assert [tuple(v.shape) for v in batch["views"].values()] == [(2, 3, 48, 48), (2, 3, 48, 48), (2, 3, 24, 24)]
    assert list(batch["boxes"]) == ["v1:v2", "v2", "v1:v3", "v3"]
    assert [tuple(b.shape) for b in batch["boxes"].values()] == [(2, 3, 4)] * 4
    assert list(batch["views"]) == ["v1", "v2", "v3"] and batch["skipped"] == 0
    # A sample does not depend on its batch or on the order of access.
    single = dataset[1]
    assert all(torch.equal(single["data"]["views"][v], in_process[0]["views"][v][1]) for v in ("v1", "v2", "v3"))


def test_epoch_and_seed_change_the_views_and_return_to_them(folder_and_store):
    images, store = folder_and_store
    dataset = SoCoDataset(images, store, SMALL_VIEWS, seed=0)
    epoch0 = dataset[0]
    dataset.set_epoch(1)
    epoch1 = dataset[0]
    dataset.set_epoch(0)
    again = dataset[0]
    other_seed = SoCoDataset(images, store, SMALL_VIEWS, seed=1, check_images=False)[0]
    assert all(torch.equal(epoch0["data"]["views"][v], again["data"]["views"][v]) for v in ("v1", "v2", "v3"))
    assert not torch.equal(epoch0["data"]["views"]["v2"], epoch1["data"]["views"]["v2"])
    assert not torch.equal(epoch0["data"]["views"]["v2"], other_seed["data"]["views"]["v2"])
    assert len({sample_seed(0, e, i) for e in range(5) for i in range(5)}) == 25


def test_boxes_lie_within_each_view(folder_and_store):
    images, store = folder_and_store
    batch = batches(SoCoDataset(images, store, SMALL_VIEWS), workers=0, batch_size=4)[0]
    for boxes, side in zip(batch["boxes"].values(), (48, 48, 48, 24)):
        assert boxes.min() >= 0 and boxes.max() <= side
        assert ((boxes[..., 2] - boxes[..., 0]) > 0).all()


def test_unreadable_image_is_skipped_and_counted(folder_and_store):
    images, store = folder_and_store
    target = images / "img_2.png"
    target.write_bytes(b"\x89PNG garbage" + bytes(200))
    with pytest.raises(ProposalStoreError, match="changed"):
        SoCoDataset(images, store, SMALL_VIEWS)
    dataset = SoCoDataset(images, store, SMALL_VIEWS, check_images=False)
    # The unreadable image is replaced by the next one, so batches stay full.
    assert dataset[2]["path"] == "img_3.png" and [r.path for r in dataset[2]["replaced"]] == ["img_2.png"]
    total_images = 0
    for workers in (0, 2):
        counted = SoCoDataset(images, store, SMALL_VIEWS, check_images=False)
        for batch in batches(counted, workers=workers):
            counted.count_skipped(batch)
            total_images += len(batch["paths"])
        assert counted.skipped == 1
        assert list(counted.skipped_paths) == ["img_2.png"]
    assert total_images == 2 * 4


def test_truncated_and_missing_files_are_skipped(folder_and_store):
    images, store = folder_and_store
    data = (images / "img_0.png").read_bytes()
    (images / "img_0.png").write_bytes(data[: len(data) // 2])
    (images / "img_3.png").unlink()
    dataset = SoCoDataset(images, store, SMALL_VIEWS, check_images=False)
    batch = collate_views([dataset[i] for i in range(len(dataset))])
    # img_0 -> img_1; img_3 -> img_0 (also unreadable) -> img_1: every encounter is counted.
    assert batch["paths"] == ["img_1.png", "img_1.png", "img_2.png", "img_1.png"]
    assert batch["skipped"] == 3 and set(batch["skipped_paths"]) == {"img_0.png", "img_3.png"}
    assert "truncated" in batch["skipped_paths"]["img_0.png"]
    assert "not found" in batch["skipped_paths"]["img_3.png"]


def test_image_of_another_size_is_skipped(folder_and_store):
    images, store = folder_and_store
    Image.new("RGB", (30, 30), (200, 10, 10)).save(images / "img_1.png")
    sample = SoCoDataset(images, store, SMALL_VIEWS, check_images=False)[1]
    assert sample["path"] == "img_2.png" and "30x30" in sample["replaced"][0].reason


def test_collate_of_only_skipped_samples_is_an_empty_batch():
    batch = collate_views([SkippedSample(0, "a.png", "truncated image"), None])
    assert "views" not in batch and "boxes" not in batch and len(batch["indices"]) == 0
    assert batch["skipped"] == 2 and batch["skipped_paths"] == {"a.png": "truncated image"}


def test_mismatched_store_is_refused(tmp_path):
    images = tmp_path / "images"
    write_images(images)
    store = build_store(images, tmp_path / "store")
    Image.new("RGB", (70, 70)).save(images / "extra.png")
    with pytest.raises(ProposalStoreError, match="another image folder"):
        SoCoDataset(images, store, SMALL_VIEWS)
    with pytest.raises(ProposalStoreError):
        SoCoDataset(tmp_path / "images", tmp_path / "no_store", SMALL_VIEWS)


def test_dataset_pickles_without_the_store_arrays(folder_and_store):
    images, store = folder_and_store
    dataset = SoCoDataset(images, store.folder, SMALL_VIEWS, seed=5)
    payload = pickle.dumps(dataset)
    assert len(payload) < 5000
    copy = pickle.loads(payload)
    assert all(torch.equal(dataset[3]["data"]["views"][v], copy[3]["data"]["views"][v]) for v in ("v1", "v2", "v3"))


def test_draw_batch_views_writes_a_grid(folder_and_store, tmp_path):
    images, store = folder_and_store
    batch = batches(SoCoDataset(images, store, SMALL_VIEWS), workers=0, batch_size=4)[0]
    boxes = {name: batch["boxes"][name] for name in ("v2", "v3")} | {"v1": batch["boxes"]["v1:v2"]}
    path = draw_views(batch["views"], boxes, tmp_path / "out" / "views.png", batch["paths"], max_images=2)
    with Image.open(path) as picture:
        width, height = picture.size
        kind = picture.format
    assert kind == "PNG" and width == 780 and height == 520  # 3 views of 2.6 in, 2 images, 100 dpi
    with pytest.raises(ValueError):
        draw_views({}, None, tmp_path / "empty.png")


def test_a_run_of_unreadable_images_gives_a_skipped_sample(folder_and_store):
    images, store = folder_and_store
    for number in range(4):
        (images / f"img_{number}.png").write_bytes(b"not an image")
    sample = SoCoDataset(images, store, SMALL_VIEWS, check_images=False)[1]
    assert isinstance(sample, SkippedSample) and sample.path == "img_1.png"


class ReadsAnotherImage:
    """A transform that, like InsLoc's, reads a second image of the data set through the source."""

    needs_proposals = True

    def __call__(self, image, proposals, generator, source):
        other, other_boxes, other_index = source.draw(generator)
        return {"shape": torch.tensor(image.shape), "other_shape": torch.tensor(other.shape),
                "other_index": other_index, "other_boxes": torch.from_numpy(np.array(other_boxes))}

    def collate(self, samples):
        return {"other_index": torch.tensor([s["other_index"] for s in samples]),
                "other_shape": torch.stack([s["other_shape"] for s in samples])}


def test_a_transform_reads_other_images_reproducibly_and_never_an_unreadable_one(folder_and_store):
    images, store = folder_and_store
    (images / "img_2.png").write_bytes(b"not an image")
    dataset = ImageDataset(images, store, ReadsAnotherImage(), seed=1, check_images=False)
    drawn = [dataset.relative_path(dataset[(epoch, position)]["data"]["other_index"])
             for epoch in range(6) for position in range(4)]
    again = [dataset.relative_path(dataset[(epoch, position)]["data"]["other_index"])
             for epoch in range(6) for position in range(4)]
    assert drawn == again  # drawn with the sample's own generator
    # the unreadable image is redrawn, the failed store entry never drawn, the others all come up
    assert set(drawn) == {"img_0.png", "img_1.png", "img_3.png"}
    sample = dataset[(0, 0)]["data"]
    index = sample["other_index"]
    width, height = SIZES[int(dataset.relative_path(index)[4])]
    assert sample["other_shape"].tolist() == [height, width, 3]
    assert torch.equal(sample["other_boxes"], torch.from_numpy(np.array(store.boxes(index))))
    batch = dataset.collate([dataset[i] for i in range(4)])
    assert batch["other_index"].shape == (4,) and batch["paths"][0] == "img_0.png"


def test_a_method_without_proposals_reads_the_folder_and_one_that_needs_them_is_refused(tmp_path):
    images = tmp_path / "images"
    write_images(images)

    class WholeImages:
        needs_proposals = False

        def __call__(self, image, proposals, generator, source):
            assert proposals.shape == (0, 4)
            return {"pixels": torch.tensor(image.shape)}

        def collate(self, samples):
            return {"pixels": torch.stack([s["pixels"] for s in samples])}

    dataset = ImageDataset(images, None, WholeImages())
    assert len(dataset) == 4 and dataset[1]["path"] == "img_1.png"
    with pytest.raises(DataError, match="needs object proposals"):
        ImageDataset(images, None, SoCoTransform(SMALL_VIEWS))
    with pytest.raises(ValueError, match="keys"):
        BatchCollate(type("Clash", (), {"collate": lambda self, s: {"paths": []}})())([dataset[0]])
    assert isinstance(SampleSource(dataset), SampleSource) and len(SampleSource(dataset)) == 4


def test_an_image_whose_stored_boxes_are_not_finite_is_left_out_and_a_store_of_only_such_is_refused(tmp_path):
    images = tmp_path / "images"
    write_images(images)
    store = build_store(images, tmp_path / "store")
    boxes = np.load(store.folder / "boxes.npy")
    boxes[store._box_offsets[1]] = np.nan  # one box of img_1 overwritten, as a damaged file would be
    np.save(store.folder / "boxes.npy", boxes)
    dataset = SoCoDataset(images, ProposalStore(store.folder), SMALL_VIEWS, check_images=False)
    sample = dataset[1]
    assert sample["path"] == "img_2.png" and "are not finite numbers" in sample["replaced"][0].reason
    boxes[:] = np.inf
    np.save(store.folder / "boxes.npy", boxes)
    with pytest.raises(DataError, match=r"no image in .* can be read: all 4 files tried .*not finite numbers"):
        SoCoDataset(images, ProposalStore(store.folder), SMALL_VIEWS, check_images=False).check_readable()
