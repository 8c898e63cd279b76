"""Multi-view studies: the phantom corpus films each patient PA and LATERAL, the writer keeps a
study in one row group, the pipeline groups a study's views into one sample with a view mask,
the report generator averages its tokens over the real views only, and generate_reports
writes one report per study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raydiology.config import DataConfig, load_experiment, save_resolved
from raydiology.config_base import ConfigError, from_dict, to_dict
from raydiology.data.corpus import CorpusWriter, read_rows, shard_paths
from raydiology.data.phantom import LABEL_COLUMNS, make_phantom, write_phantom_corpus
from raydiology.data.pipeline import read_row_group, row_keys, to_model_input
from raydiology.evaluation.protocol import get_protocol, reference_text
from raydiology.registry import build_model, build_objective

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STAGE3 = EXPERIMENTS / "mambaxray_vl" / "stage3_sft.yaml"


def _samples(corpus: Path, data: DataConfig, **preprocess) -> list[dict[str, np.ndarray]]:
    """Every batch `read_row_group` yields for every row group of the corpus (no Ray)."""
    preprocess.setdefault("label_columns", [])
    columns = ["image_id", "pixels", "height", "width", "dtype", *preprocess["label_columns"]]
    columns += list(preprocess.get("extra_columns", {}).values())
    out = []
    for path in shard_paths(corpus):
        for group in range(pq.ParquetFile(path).metadata.num_row_groups):
            unit = {"path": np.array([path]), "row_group": np.array([group])}
            out += read_row_group(unit, columns=columns, data=to_dict(data), **preprocess)
    return out


# ----------------------------------------------------------------------------- corpus


def test_lateral_view_is_the_same_patient_and_report_from_the_side():
    pa = make_phantom(np.random.default_rng([0, 3]), size=64, findings={"cardiomegaly": True})
    lat = make_phantom(
        np.random.default_rng([0, 3]), size=64, findings={"cardiomegaly": True}, view="LATERAL"
    )
    assert (pa.view, lat.view) == ("PA", "LATERAL")
    assert pa.report == lat.report and pa.findings == lat.findings
    assert np.abs(pa.image.astype(int) - lat.image.astype(int)).mean() > 10  # another film
    normal = make_phantom(
        np.random.default_rng([0, 3]), size=64, findings={"cardiomegaly": False}, view="LATERAL"
    )
    assert not np.array_equal(normal.image, lat.image)  # the finding shows on the lateral too
    with pytest.raises(ValueError, match="view"):
        make_phantom(np.random.default_rng(0), size=64, view="AP")  # type: ignore[arg-type]


def test_two_view_phantom_corpus_shares_study_report_labels_and_split(tmp_path):
    # 5-row row groups: every second study would straddle a boundary without the writer's care
    write_phantom_corpus(tmp_path / "c", n=9, size=32, views=2, shard_rows=5, progress=False)
    table = read_rows(tmp_path / "c").to_pylist()
    assert len(table) == 18
    assert [r["view"] for r in table] == ["PA", "LATERAL"] * 9
    for pa, lat in zip(table[::2], table[1::2], strict=True):
        assert pa["study_id"] == lat["study_id"] != pa["image_id"]
        for key in ("report", "split", "sex", "age_group", *LABEL_COLUMNS):
            assert pa[key] == lat[key], key
    for path in shard_paths(tmp_path / "c"):  # each row group holds whole studies
        shard = pq.ParquetFile(path)
        for group in range(shard.metadata.num_row_groups):
            studies = shard.read_row_group(group, columns=["study_id"]).column(0).to_pylist()
            assert len(studies) % 2 == 0 and studies[::2] == studies[1::2]
    # a single-view corpus keeps its image ids and gains a one-image study per row
    write_phantom_corpus(tmp_path / "one", n=3, size=32, progress=False)
    rows = read_rows(tmp_path / "one").to_pylist()
    assert (
        [r["image_id"] for r in rows]
        == [r["study_id"] for r in rows]
        == [f"phantom-{i:07d}" for i in range(3)]
    )


def test_views_config_is_checked():
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"phantom": {"views": 3}}, "data")
    assert err.value.key == "data.phantom.views"
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"study_views": 0}, "data")
    assert err.value.key == "data.study_views"


# ----------------------------------------------------------------------------- pipeline


def test_every_study_arrives_as_one_sample_with_its_views_and_mask(tmp_path):
    write_phantom_corpus(tmp_path / "c", n=9, size=32, views=2, shard_rows=5, progress=False)
    table = read_rows(tmp_path / "c")
    pixels = {r["image_id"]: r["pixels"] for r in table.to_pylist()}
    reports = {r["study_id"]: r["report"] for r in table.to_pylist()}
    # 3 images a decode batch: a study would be cut in two without study-aligned chunks
    data = DataConfig(resolution=32, study_views=2, decode_batch_size=3, shuffle_seed=None)
    samples = _samples(
        tmp_path / "c", data, label_columns=list(LABEL_COLUMNS), extra_columns={"report": "report"}
    )
    keys = np.concatenate([s["row_key"] for s in samples])
    studies = [f"phantom-{i:07d}" for i in range(9)]
    assert sorted(keys.tolist()) == sorted(row_keys(np.array(studies)).tolist())
    by_key = dict(zip(row_keys(np.array(studies)).tolist(), studies, strict=True))
    for s in samples:
        assert s["image"].shape[1:] == (2, 1, 32, 32) and s["image"].dtype == np.uint8
        assert s["view_mask"].dtype == bool and s["view_mask"].all()
        for key, image, report in zip(s["row_key"], s["image"], s["report"], strict=True):
            study = by_key[int(key)]
            assert report == reports[study]
            for v, view in enumerate(("pa", "lateral")):  # frontal first
                stored = np.frombuffer(pixels[f"{study}-{view}"], np.uint8).reshape(32, 32)
                assert np.array_equal(image[v, 0], stored)


def test_ragged_studies_are_padded_masked_and_frontal_first(tmp_path):
    rng = np.random.default_rng(0)

    def row(image_id, study, view):
        return {"image_id": image_id, "pixels": rng.integers(1, 255, (16, 16), dtype=np.uint8),
                "study_id": study, "view": view, "report": f"report of {study or image_id}"}  # fmt: skip

    # row groups of 2 rows: the writer lets study "a" (3 views) run to 3
    with CorpusWriter(tmp_path / "c", made_by={}, row_group_rows=2) as writer:
        for r in [row("a1", "a", "LATERAL"), row("a2", "a", "AP"), row("a3", "a", "PA"),
                  row("b1", "b", "LATERAL"), row("lone", None, "PA")]:  # fmt: skip
            writer.add(r)
    groups = [pq.ParquetFile(p).metadata.num_row_groups for p in shard_paths(tmp_path / "c")]
    first = pq.ParquetFile(shard_paths(tmp_path / "c")[0]).read_row_group(0)
    assert first.column("study_id").to_pylist() == ["a", "a", "a"] and sum(groups) == 2
    stored = {r["image_id"]: r["pixels"] for r in read_rows(tmp_path / "c").to_pylist()}
    data = DataConfig(resolution=16, study_views=2, decode_batch_size=1, shuffle_seed=None)
    samples = _samples(tmp_path / "c", data, extra_columns={"report": "report"})
    got = {str(r): (s["image"][i], s["view_mask"][i])
           for s in samples for i, r in enumerate(s["report"])}  # fmt: skip
    assert sorted(got) == ["report of a", "report of b", "report of lone"]

    def pix(image_id):
        return np.frombuffer(stored[image_id], np.uint8).reshape(16, 16)

    image, mask = got["report of a"]  # PA then AP; the lateral is the third view, dropped
    assert mask.tolist() == [True, True]
    assert np.array_equal(image[0, 0], pix("a3")) and np.array_equal(image[1, 0], pix("a2"))
    for name, only in (("report of b", "b1"), ("report of lone", "lone")):
        image, mask = got[name]
        assert mask.tolist() == [True, False]
        assert np.array_equal(image[0, 0], pix(only)) and not image[1].any()


def test_a_corpus_without_study_ids_is_refused_by_name(tmp_path):
    with CorpusWriter(tmp_path / "c", made_by={}) as writer:
        writer.add({"image_id": "x", "pixels": np.zeros((16, 16), np.uint8)})
    # written by this version, so the column exists, null: each image is its own study
    data = DataConfig(resolution=16, study_views=2, shuffle_seed=None)
    (sample,) = _samples(tmp_path / "c", data)
    assert sample["view_mask"].tolist() == [[True, False]]
    # an older corpus has no study_id column at all
    old = tmp_path / "c" / "shards" / "part-00000.parquet"
    pq.write_table(pq.read_table(old).drop(["study_id"]), old)
    with pytest.raises(ValueError, match="study_id"):
        _samples(tmp_path / "c", data)


def test_to_model_input_normalises_each_view_like_a_single_image():
    data = DataConfig(resolution=8, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    images = torch.randint(0, 255, (2, 3, 1, 8, 8), dtype=torch.uint8)
    x = to_model_input(images, data, dtype=torch.float32)
    assert x.shape == (2, 3, 3, 8, 8)
    for v in range(3):
        assert torch.equal(x[:, v], to_model_input(images[:, v], data, dtype=torch.float32))


@pytest.mark.ray
def test_ray_pipeline_delivers_whole_studies(ray_cluster, tmp_path):
    from raydiology.data.pipeline import build_dataset, collate

    write_phantom_corpus(tmp_path / "c", n=7, size=32, views=2, shard_rows=5, progress=False)
    data = DataConfig(resolution=32, study_views=2, decode_batch_size=3)
    ds = build_dataset(data, str(tmp_path / "c"), extra_columns={"report": "report"})
    batches = list(ds.iter_torch_batches(batch_size=4, collate_fn=collate))
    assert sum(b["image"].shape[0] for b in batches) == 7
    for b in batches:
        assert b["image"].shape[1:] == (2, 1, 32, 32) and b["view_mask"].all()
        assert len(b["report"]) == b["image"].shape[0]


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def generator():
    exp = load_experiment(STAGE3, profile="sft_smoke", overrides=["data.resolution=64"])
    torch.manual_seed(0)
    return build_model(exp.model, exp.data), exp


def test_one_view_study_gives_the_same_output_alone_or_padded(generator):
    model, _ = generator
    model.eval()
    g = torch.Generator().manual_seed(0)
    single = torch.randn(2, 3, 64, 64, generator=g)
    padded = torch.stack([single, torch.randn(2, 3, 64, 64, generator=g)], dim=1)  # [B, 2, ...]
    mask = torch.tensor([[True, False], [True, False]])
    with torch.no_grad():
        want = model.embed_images(single)
        torch.testing.assert_close(model.embed_images(single[:, None]), want)
        torch.testing.assert_close(model.embed_images(padded, mask), want)
        ids = [model.tokenizer.encode("the heart is enlarged ."), model.tokenizer.encode("clear")]
        torch.testing.assert_close(model(padded, ids, mask), model(single, ids))
    settings = dict(num_beams=2, max_new_tokens=6, min_new_tokens=2)
    assert model.generate(padded, view_mask=mask, **settings) == model.generate(single, **settings)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_masked_mean_ignores_padded_views(generator, mode):
    model, _ = generator
    model.train(mode == "train")  # train: BatchNorm's batch statistics must not see padding
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 2, 3, 64, 64, generator=g)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    changed = images.clone()
    changed[1, 1] = torch.randn(3, 64, 64, generator=g) * 5
    with torch.no_grad():
        a, b = model.embed_images(images, mask), model.embed_images(changed, mask)
        assert torch.equal(a, b)
        assert not torch.equal(model.embed_images(changed), model.embed_images(images))
        if mode == "eval":  # two real views: the plain mean of both views' tokens
            tokens = model.encoder(images.flatten(0, 1)).unflatten(0, (3, 2))
            mean = tokens[0].mean(dim=0, keepdim=True)
            torch.testing.assert_close(a[:1], model.proj_norm(model.proj(mean)))
    model.eval()


def test_generate_reports_writes_one_report_per_study(generator, tmp_path):
    from raydiology.evaluation.generate import generate_reports
    from raydiology.train.export import export_encoder

    model, exp = generator
    model.eval()
    exp = load_experiment(
        STAGE3, profile="sft_smoke", overrides=["data.resolution=64", "data.study_views=2"]
    )
    objective = build_objective(exp.objective, model)
    run = tmp_path / "run"
    export_encoder(objective, run / "export", exp=exp, corpus_sha256=None, step=0)
    objective.export_extra(run / "export", write=True, gather=False)
    save_resolved(exp, run / "config.yaml")
    write_phantom_corpus(tmp_path / "c", n=5, size=64, views=2, progress=False)
    quick = {"num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 1, "batch_size": 2}
    rows = generate_reports(run, tmp_path / "c", split=None, generation=quick)
    table = read_rows(tmp_path / "c").to_pylist()
    assert [r["id"] for r in rows] == [f"phantom-{i:07d}" for i in range(5)]
    tok = objective.model.tokenizer
    # the run's protocol (stage 3: cxpmrg): findings only, cut to 100 tokens, recorded
    cxpmrg = get_protocol(exp.evaluation.protocol)
    assert cxpmrg.name == "cxpmrg"
    findings = [reference_text(t["findings"], cxpmrg, tok) for t in table[::2]]
    assert [r["reference"] for r in rows] == findings
    assert not any("impression" in r["reference"] for r in rows)  # the report column has it
    assert all(r["prediction"] for r in rows)
    info = json.loads((run / "eval" / "run.json").read_text())
    assert info["protocol"] == cxpmrg.describe() and info["reports"] == 5
    assert info["test_time_per_report_s"] > 0 and info["images_without_section"] == 0
    # a single-view reading of the same corpus: one report per image
    rows = generate_reports(run, tmp_path / "c", split=None, generation=quick, study_views=1)
    assert [r["id"] for r in rows] == [t["image_id"] for t in table]
    # another protocol chosen at generation: the whole report as the tokenizer prepares it
    rows = generate_reports(run, tmp_path / "c", split=None, generation=quick,
                            protocol="raydiology")  # fmt: skip
    assert [r["reference"] for r in rows] == [tok.prepare(t["report"]) for t in table[::2]]
