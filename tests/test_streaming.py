"""The Ray Data pipeline on a real local Ray: integer batches at the model's size, a resumed
epoch that neither repeats nor skips an image, anatomy weights, mixed stored sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydiology.config import AugmentConfig, DataConfig, TrainConfig
from raydiology.data.corpus import CorpusWriter, read_rows
from raydiology.data.phantom import write_phantom_corpus
from raydiology.data.pipeline import build_dataset, preprocess_batch, row_keys, to_model_input
from raydiology.train.loop import _epoch_batches

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("phantoms") / "c"
    write_phantom_corpus(corpus, n=40, size=48, shard_rows=8, progress=False)
    return corpus


def _split(data: DataConfig, corpus):
    (split,) = build_dataset(data, str(corpus)).streaming_split(1, equal=True)
    return split


def test_batches_are_integers_normalised_on_the_worker(ray_cluster, phantoms):
    data = DataConfig(resolution=32, shuffle_seed=0)
    batch = next(iter(_split(data, phantoms).iter_torch_batches(batch_size=4)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 1, 32, 32)
    x = to_model_input(batch["image"], data, dtype=torch.float32)
    assert x.min() >= -1.0 and x.max() <= 1.0  # (x/255 - 0.5) / 0.5


def test_actor_pool_decodes_the_same_epoch_as_tasks(ray_cluster, phantoms):
    """`decode_pool: actors` moves decoding into long-lived actors; what arrives is unchanged."""

    def epoch(pool: str) -> dict[int, np.ndarray]:
        data = DataConfig(resolution=48, shuffle_seed=None, decode_pool=pool, decode_concurrency=1)
        rows = {}
        for batch in _split(data, phantoms).iter_batches(batch_size=8, batch_format="numpy"):
            rows.update(zip(batch["row_key"].tolist(), batch["image"], strict=True))
        return rows

    tasks, actors = epoch("tasks"), epoch("actors")
    assert len(tasks) == 40 and tasks.keys() == actors.keys()
    assert all(np.array_equal(tasks[k], actors[k]) for k in tasks)


def test_fixed_size_pixels_are_read_without_a_copy(phantoms):
    """Same-size blobs become a [B, nbytes] view of Arrow's buffer and decode as the bytes do."""
    import pyarrow.parquet as pq

    from raydiology.data.corpus import decode_pixels, shard_paths
    from raydiology.data.pipeline import _PIXEL_COLUMNS, column_arrays

    table = pq.read_table(shard_paths(phantoms)[0], columns=_PIXEL_COLUMNS).slice(3, 4)
    fast = column_arrays(table, _PIXEL_COLUMNS)
    plain = {n: table.column(n).to_numpy(zero_copy_only=False) for n in _PIXEL_COLUMNS}
    assert fast["pixels"].shape == (4, 48 * 48) and not fast["pixels"].flags.owndata
    assert np.array_equal(decode_pixels(fast), decode_pixels(plain))


def test_resumed_epoch_neither_repeats_nor_skips(ray_cluster, phantoms):
    data = DataConfig(resolution=32, shuffle_seed=0)
    train = TrainConfig(micro_batch_size=4, prefetch_batches=1)
    every = set(
        row_keys(
            read_rows(phantoms, columns=["image_id"])
            .column("image_id")
            .to_numpy(zero_copy_only=False)
        ).tolist()
    )

    # The run dies after three micro-batches of an epoch...
    batches = _epoch_batches(_split(data, phantoms), train, skip=np.zeros(0, np.int64))
    seen_before = np.concatenate([next(batches)["row_key"].numpy() for _ in range(3)])
    # ...and a new launch (a new dataset) resumes that epoch from the checkpoint's keys.
    resumed = list(_epoch_batches(_split(data, phantoms), train, skip=seen_before))
    seen_after = np.concatenate([b["row_key"].numpy() for b in resumed])

    assert all(b["image"].shape[0] == 4 for b in resumed)  # refilled to full micro-batches
    assert not set(seen_before) & set(seen_after)
    assert set(seen_before) | set(seen_after) == every  # 40 images, 10 full batches


def test_anatomy_weights_mix_an_epoch(ray_cluster, tmp_path):
    corpus = tmp_path / "c"
    with CorpusWriter(corpus, made_by={"command": "test"}) as writer:
        for i in range(200):
            anatomy = "chest" if i % 2 else "knee"
            pixels = np.full((16, 16), i % 250 + 1, np.uint8)
            pixels[0, 0] = 0
            writer.add({"image_id": f"i{i}", "pixels": pixels, "anatomy": anatomy})
    data = DataConfig(resolution=16, anatomy_weights={"chest": 1.0, "knee": 0.25})
    rows = build_dataset(data, str(corpus)).take_all()
    knees = sum(int(r["image"][0, 1, 1]) % 2 == 1 for r in rows)  # odd values came from knees
    chests = len(rows) - knees
    assert chests == 100  # weight 1: every chest image
    assert 10 <= knees <= 45  # about a quarter of the 100 knee images


def test_mixed_stored_sizes_are_padded_to_square(tmp_path):
    batch = {
        "image_id": np.array(["a", "b"], dtype=object),
        "pixels": np.array(
            [
                np.full((20, 40), 200, np.uint8).tobytes(),
                np.full((40, 40), 100, np.uint8).tobytes(),
            ],
            dtype=object,
        ),
        "height": np.array([20, 40]),
        "width": np.array([40, 40]),
        "dtype": np.array(["uint8", "uint8"], dtype=object),
    }
    from raydiology.config_base import to_dict

    out = preprocess_batch(batch, data=to_dict(DataConfig(resolution=20)), label_columns=[])
    image = out["image"]
    assert image.shape == (2, 1, 20, 20) and image.dtype == np.uint8
    # The 20x40 image sits centred with zero bands above and below (XR-0's padding).
    assert image[0, 0, 0].max() == 0 and image[0, 0, 10].min() > 150
    assert image[1, 0].min() > 90


def _epoch(split) -> list[tuple[int, bytes]]:
    """One pass over a split: (row key, image bytes) in arrival order."""
    out = []
    for batch in split.iter_batches(batch_size=8, batch_format="numpy"):
        out += [
            (int(k), im.tobytes()) for k, im in zip(batch["row_key"], batch["image"], strict=True)
        ]
    return out


def test_each_epoch_differs_and_a_resume_replays_its_epoch(ray_cluster, phantoms):
    """Row-group order and augmentation are drawn per epoch; a dataset built to resume at
    epoch 1 (`first_epoch`) replays epoch 1's order and crops, not epoch 0's."""
    data = DataConfig(
        resolution=32,
        shuffle_seed=0,
        decode_concurrency=1,  # one task at a time: arrival order = row-group order
        augment=AugmentConfig(hflip=True, crop_scale=(0.5, 1.0)),
    )
    (split,) = build_dataset(data, str(phantoms)).streaming_split(1, equal=True)
    first, second = _epoch(split), _epoch(split)
    (resumed,) = build_dataset(data, str(phantoms), first_epoch=1).streaming_split(1, equal=True)
    again = _epoch(resumed)
    assert len(first) == len(second) == 40
    assert again == second
    assert [k for k, _ in first] != [k for k, _ in second]  # another row-group order
    images = dict(first)
    assert sum(images[k] != im for k, im in second) >= 30  # other crops and flips


def test_local_shuffle_varies_with_the_epoch_and_replays_on_resume(ray_cluster, phantoms):
    data = DataConfig(resolution=32, shuffle_seed=None, decode_concurrency=1)
    # No prefetch thread: with one, how many blocks sit in Ray's buffer at each draw is a
    # matter of timing, and the same seed can mix differently (the resume stays exact either
    # way: it skips the checkpoint's row keys).
    train = TrainConfig(micro_batch_size=4, local_shuffle_buffer=16, seed=3, prefetch_batches=0)

    def order(epoch: int) -> list[int]:
        batches = _epoch_batches(_split(data, phantoms), train, skip=np.zeros(0), epoch=epoch)
        return np.concatenate([b["row_key"].numpy() for b in batches]).tolist()

    assert order(1) == order(1)  # a new launch resuming epoch 1 mixes as epoch 1 did
    assert order(0) != order(1)


def test_default_shuffle_buffer_mixes_studies_in_a_micro_batch(ray_cluster, tmp_path):
    """Ingest stores rows by path, so a row group is a run of one patient's images; the
    default buffer must give micro-batches that mix patients."""
    corpus = tmp_path / "c"
    with CorpusWriter(corpus, made_by={"command": "test"}, row_group_rows=20) as writer:
        for patient in range(12):
            for i in range(20):
                pixels = np.full((16, 16), patient + 1, np.uint8)
                writer.add({"image_id": f"p{patient:02d}_{i:02d}", "pixels": pixels})
    data = DataConfig(resolution=16, shuffle_seed=0)
    train = TrainConfig(micro_batch_size=8)
    batches = list(_epoch_batches(_split(data, corpus), train, skip=np.zeros(0, np.int64)))
    patients = [len(np.unique(b["image"][:, 0, 0, 0].numpy())) for b in batches]
    assert len(batches) == 30
    assert np.mean(patients) >= 5, patients  # without a buffer: 1 or 2 a micro-batch
