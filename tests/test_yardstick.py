"""The frozen-encoder yardstick: cached features, the MLP probe, retrieval P@k and the CLI,
on phantom films with tiny HD-MAE exports (random weights)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import raydiology
from raydiology.cli import app
from raydiology.data.corpus import decode_pixels, read_rows
from raydiology.evaluation.bias import run_bias
from raydiology.evaluation.features import (
    SPLITS,
    effective_pooling,
    load_features,
    pool_tokens,
    resolve_labels,
)
from raydiology.evaluation.probe import (
    ProbeConfig,
    infer_task,
    run_probe,
    train_probe,
    training_subset,
)
from raydiology.evaluation.retrieval import precision_at_k, run_retrieval

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "hd_mae_random.yaml"
IMAGENET = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]


def _export(folder: Path, seed: int, sets: list[str]) -> Path:
    from raydiology.config import load_experiment
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder

    exp = load_experiment(EXPERIMENT, profile="smoke", overrides=sets)
    torch.manual_seed(seed)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny MLPs run ~20x slower with two intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """200 phantom films at 64 px; a 1-channel encoder at 64 px and a 3-channel one at 48 px
    (so one reads the stored pixels as they are and one goes through resize + channel repeat)."""
    from raydiology.data.phantom import write_phantom_corpus

    root = tmp_path_factory.mktemp("yardstick")
    write_phantom_corpus(root / "corpus", n=200, size=64, progress=False)
    return {
        "root": root,
        "corpus": root / "corpus",
        "gray": _export(root / "gray", 0, ["data.resolution=64"]),
        "rgb": _export(root / "rgb", 1, ["data.resolution=48", "data.channels=3", *IMAGENET]),
    }


# --- features -----------------------------------------------------------------------------


def test_features_match_the_encoder_and_are_cached(world, tmp_path) -> None:
    corpus, cache = world["corpus"], tmp_path / "cache"
    first = load_features(world["gray"], corpus, pooling="cls", cache_dir=cache, progress=False)
    assert not first.cached and first.pooling == "cls" and first.encoder == "gray"
    assert first.features.shape == (200, 64) and first.features.dtype == np.float32

    rows = read_rows(corpus, columns=["image_id", "pixels", "height", "width", "dtype", "split",
                                      "label_cardiomegaly", "sex", "age_group"])  # fmt: skip
    assert list(first.image_ids) == rows.column("image_id").to_pylist()
    assert list(first.split) == rows.column("split").to_pylist()
    assert set(first.split) == {"train", "val", "test"}
    assert np.array_equal(
        first.select(["label_cardiomegaly"])[:, 0], rows.column("label_cardiomegaly").to_numpy()
    )
    # The subgroup columns travel with the features (for `evaluate bias`).
    assert set(first.groups) == {"sex", "age_group"}
    for column in ("sex", "age_group"):
        assert list(first.groups[column]) == rows.column(column).to_pylist()
    assert set(first.groups["sex"]) == {"F", "M"}

    # By hand: 8-bit pixels at the encoder's size -> (x/255 - 0.5)/0.5 -> CLS token.
    batch = {k: rows.column(k).to_numpy(zero_copy_only=False)[:4] for k in rows.column_names}
    pixels = torch.from_numpy(decode_pixels(batch).astype(np.float32))[:, None] / 255
    encoder = raydiology.load_encoder(world["gray"])
    with torch.no_grad():
        want = encoder((pixels - 0.5) / 0.5)[:, 0]
    torch.testing.assert_close(torch.from_numpy(first.features[:4]), want, atol=1e-5, rtol=1e-5)

    # A rerun reads the cache (same bytes, file untouched); another pooling is another entry.
    (npy,) = cache.glob("*.npy")
    stamp = npy.stat().st_mtime_ns
    again = load_features(world["gray"], corpus, pooling="cls", cache_dir=cache, progress=False)
    assert again.cached and np.array_equal(again.features, first.features)
    assert list(again.groups["age_group"]) == list(first.groups["age_group"])
    assert npy.stat().st_mtime_ns == stamp
    renamed = load_features(
        world["gray"], corpus, pooling="cls", cache_dir=cache, name="other", progress=False
    )
    assert renamed.cached and renamed.encoder == "other"
    mean = load_features(world["gray"], corpus, pooling="mean", cache_dir=cache, progress=False)
    assert not mean.cached and len(list(cache.glob("*.npy"))) == 2
    assert not np.allclose(mean.features, first.features)

    # The 3-channel 48-px encoder: antialiased resize, quantised to 8 bits like training
    # batches, grey repeated, ImageNet mean/std, then the mean of the patch tokens.
    rgb = load_features(world["rgb"], corpus, pooling="mean", cache_dir=cache, progress=False)
    small = F.interpolate(pixels, size=(48, 48), mode="bilinear", antialias=True)
    small = (small * 255).round().clamp(0, 255) / 255
    mean_t = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std_t = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    encoder = raydiology.load_encoder(world["rgb"])
    with torch.no_grad():
        want = encoder((small.expand(-1, 3, -1, -1) - mean_t) / std_t)[:, 1:].mean(1)
    torch.testing.assert_close(torch.from_numpy(rgb.features[:4]), want, atol=1e-5, rtol=1e-5)


def test_pooling_and_label_globs() -> None:
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    assert torch.equal(pool_tokens(tokens, 1, "cls"), tokens[:, 0])
    assert torch.equal(pool_tokens(tokens, 1, "mean"), tokens[:, 1:].mean(1))
    assert torch.equal(pool_tokens(tokens, 0, "mean"), tokens.mean(1))

    class NoCLS(torch.nn.Module):
        num_prefix_tokens = 0

    used, notes = effective_pooling(NoCLS(), "cls")
    assert used == "mean" and "no CLS" in notes[0]
    assert effective_pooling(NoCLS(), "mean") == ("mean", [])
    with pytest.raises(ValueError, match="pooling"):
        effective_pooling(NoCLS(), "max")

    columns = ("label_no_finding", "label_cardiomegaly", "label_pleural_effusion")
    assert resolve_labels(["label_*"], columns) == list(columns)
    assert resolve_labels(["label_pleural*", "label_cardiomegaly", "label_pl*"], columns) == [
        "label_pleural_effusion",
        "label_cardiomegaly",
    ]
    with pytest.raises(ValueError, match="matches no label column"):
        resolve_labels(["label_fracture"], columns)


def test_rows_without_split_get_a_fixed_split_from_their_id(tmp_path) -> None:
    from raydiology.data.corpus import CorpusWriter
    from raydiology.evaluation.features import corpus_table, hash_split

    with CorpusWriter(tmp_path / "c", made_by={"command": "test"}) as writer:
        for i in range(40):
            split = "test" if i < 5 else None  # only some rows carry a split
            pixels = np.full((16, 16), i, dtype=np.uint8)
            writer.add({"image_id": f"x{i}", "pixels": pixels, "split": split, "label_a": i % 2})
    table = corpus_table(tmp_path / "c")
    assert table["split_from_hash"] == 35 and table["label_columns"] == ("label_a",)
    assert list(table["split"][:5]) == ["test"] * 5
    assert list(table["split"][5:]) == [hash_split(f"x{i}") for i in range(5, 40)]
    assert set(table["split"][5:]) == {"train", "val", "test"}
    assert table["labels"][:, 0].tolist() == [i % 2 for i in range(40)]


# --- probe --------------------------------------------------------------------------------


def _synthetic(n: int = 400, *, seed: int = 0):
    """Two labels that a probe can read from 16-d features, plus a 80/10/10 split."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 2)) < 0.3).astype(np.float32)
    features = rng.standard_normal((n, 16)).astype(np.float32)
    features[:, :2] += 4.0 * labels  # label j shifts feature j
    split = np.array(["train"] * (n * 8 // 10) + ["val"] * (n // 10) + ["test"] * (n // 10))
    return features, labels, split


def test_training_subsets_are_fixed_nested_and_cover_classes() -> None:
    _, labels, _ = _synthetic()
    small = training_subset(labels, 0.01, seed=3, task="multilabel")
    assert np.array_equal(small, training_subset(labels, 0.01, seed=3, task="multilabel"))
    assert not np.array_equal(small, training_subset(labels, 0.01, seed=4, task="multilabel"))
    for j in range(labels.shape[1]):  # a positive and a negative of every label
        assert set(labels[small, j]) == {0.0, 1.0}
    assert len(small) <= round(0.01 * len(labels)) + 2 * labels.shape[1]
    big = training_subset(labels, 0.1, seed=3, task="multilabel")
    assert len(big) == round(0.1 * len(labels))
    assert set(big) <= set(range(len(labels)))
    assert len(training_subset(labels, 1.0, seed=0, task="multilabel")) == len(labels)
    onehot = np.eye(3, dtype=np.float32)[np.arange(300) % 3]
    assert set(onehot[training_subset(onehot, 0.001, seed=0, task="multiclass")].argmax(1)) == {
        0,
        1,
        2,
    }


def test_probe_learns_separable_labels_and_reports_the_protocol() -> None:
    features, labels, split = _synthetic()
    cfg = ProbeConfig(
        fractions=(0.05, 1.0), seeds=3, max_epochs=30, hidden_dim=64, batch_size=32, lr=1e-3
    )
    columns = ["label_a", "label_b"]
    out = run_probe(features, labels, split, label_columns=columns, cfg=cfg)
    assert out["task"] == "multilabel" and out["n"] == {"train": 320, "val": 40, "test": 40}
    assert list(out["fractions"]) == ["5%", "100%"]
    for cell in out["fractions"].values():
        assert len(cell["seeds"]) == 3 and [r["seed"] for r in cell["seeds"]] == [0, 1, 2]
        assert set(cell["auroc"]) == set(columns)
        for run in cell["seeds"]:
            assert set(run["auroc"]) == set(columns)
            assert all(0.0 <= v <= 1.0 for v in run["auroc"].values())
            assert -1.0 <= run["mcc"] <= 1.0 and 1 <= run["epochs"] <= 30
        aurocs = [r["auroc_mean"] for r in cell["seeds"]]
        assert cell["auroc_mean"]["mean"] == pytest.approx(np.mean(aurocs))
        assert cell["auroc_mean"]["std"] == pytest.approx(np.std(aurocs, ddof=1))
    full = out["fractions"]["100%"]
    assert full["n_train"] == [320, 320, 320]
    assert full["auroc_mean"]["mean"] > 0.9 and full["mcc"]["mean"] > 0.6
    assert out["fractions"]["5%"]["auroc_mean"]["std"] > 0  # different subsets per seed
    json.dumps(out, allow_nan=False)

    # Deterministic given the seed; noise features give chance-level AUROC, not 0.9.
    again = run_probe(
        features, labels, split, label_columns=columns, cfg=replace(cfg, fractions=(0.05,))
    )
    assert again["fractions"]["5%"] == out["fractions"]["5%"]
    noise = np.random.default_rng(9).standard_normal(features.shape).astype(np.float32)
    blind = run_probe(
        noise, labels, split, label_columns=columns, cfg=replace(cfg, fractions=(1.0,), seeds=2)
    )
    assert blind["fractions"]["100%"]["auroc_mean"]["mean"] < 0.75


def test_probe_default_is_xr0s_protocol_and_v1_is_kept() -> None:
    xr0 = ProbeConfig()
    # XR-0's probe training: Adam 1e-4, weight decay 1e-6, batch 64, <= 500 epochs, lr
    # halved after 2 epochs without a better val score, early stop on the val score
    assert (xr0.lr, xr0.weight_decay, xr0.batch_size, xr0.max_epochs) == (1e-4, 1e-6, 64, 500)
    assert (xr0.lr_factor, xr0.lr_patience, xr0.monitor) == (0.5, 2, "score")
    assert ProbeConfig.of("xr0") == xr0
    v1 = ProbeConfig.of("raydiology-v1", seeds=2)
    assert (v1.lr, v1.weight_decay, v1.batch_size, v1.max_epochs) == (1e-4, 0.0, 256, 200)
    assert (v1.monitor, v1.patience, v1.seeds) == ("loss", 10, 2)
    with pytest.raises(ValueError, match="protocol"):
        ProbeConfig.of("xr-0")


def test_xr0_probe_stops_on_the_val_score_and_keeps_its_best_epoch() -> None:
    """Monitored on the val score (mean val AUROC): the lr is halved on a plateau, training
    stops `patience` epochs after the best-scoring epoch, whose weights are returned."""
    features, labels, split = _synthetic()
    noise = np.random.default_rng(3).standard_normal(features.shape).astype(np.float32)
    cfg = ProbeConfig(lr=1e-3, hidden_dim=64, max_epochs=300, patience=6)
    assert cfg.monitor == "score"
    train, val = split == "train", split == "val"
    model, log = train_probe(
        noise[train], labels[train], noise[val], labels[val], task="multilabel", cfg=cfg, seed=0
    )
    assert log["monitor"] == "score"
    assert log["epochs"] < 300 and log["epochs"] == log["best_epoch"] + cfg.patience
    assert log["final_lr"] < cfg.lr
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(noise[val]))).numpy()
    want = np.mean([roc_auc_score(labels[val][:, j], probs[:, j]) for j in range(2)])
    assert log["best_val_score"] == pytest.approx(want, rel=1e-9)


def test_probe_stops_early_and_keeps_its_best_epoch() -> None:
    """raydiology-v1, on the val loss: on noise the val loss soon rises, the LR is halved,
    training stops `patience` epochs after the best one, and the returned weights are the
    best epoch's."""
    features, labels, split = _synthetic()
    noise = np.random.default_rng(3).standard_normal(features.shape).astype(np.float32)
    cfg = ProbeConfig.of(
        "raydiology-v1", lr=1e-3, hidden_dim=64, batch_size=32, max_epochs=300, patience=6
    )
    train, val = split == "train", split == "val"
    model, log = train_probe(
        noise[train], labels[train], noise[val], labels[val], task="multilabel", cfg=cfg, seed=0
    )
    assert log["epochs"] < 300 and log["epochs"] == log["best_epoch"] + cfg.patience
    assert log["final_lr"] < cfg.lr
    with torch.no_grad():
        val_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(torch.from_numpy(noise[val])), torch.from_numpy(labels[val])
        )
    assert float(val_loss) == pytest.approx(log["best_val_loss"], rel=1e-5)


def test_probe_multiclass_uses_one_hot_columns() -> None:
    rng = np.random.default_rng(1)
    cls = rng.integers(0, 3, 300)
    labels = np.eye(3, dtype=np.float32)[cls]
    features = rng.standard_normal((300, 8)).astype(np.float32)
    features[np.arange(300), cls] += 3.0
    split = np.array(["train"] * 200 + ["val"] * 50 + ["test"] * 50)
    assert infer_task(labels) == "multiclass" and infer_task(labels[:, :1]) == "multilabel"
    with pytest.raises(ValueError, match="one-hot"):
        infer_task(np.ones((4, 2), dtype=np.float32), "multiclass")
    cfg = ProbeConfig(
        fractions=(1.0,), seeds=2, max_epochs=30, hidden_dim=64, batch_size=32, lr=1e-3
    )
    out = run_probe(features, labels, split, label_columns=["a", "b", "c"], cfg=cfg)
    assert out["task"] == "multiclass"
    assert out["fractions"]["100%"]["auroc_mean"]["mean"] > 0.9
    assert out["fractions"]["100%"]["mcc"]["mean"] > 0.5


# --- retrieval ----------------------------------------------------------------------------


def _brute_precision(queries, gallery, ql, gl, k, match) -> float:
    """Python loops: cosine, full stable ranking, label agreement counted by hand."""
    total = 0.0
    for q, labels in zip(queries, ql, strict=True):
        sims = [float(np.dot(q, g) / (np.linalg.norm(q) * np.linalg.norm(g))) for g in gallery]
        ranked = sorted(range(len(gallery)), key=lambda i: -sims[i])[:k]
        if match == "exact":
            hits = sum(all(labels == gl[i]) for i in ranked)
        else:
            hits = sum(any((labels == 1) & (gl[i] == 1)) for i in ranked)
        total += hits / len(ranked)
    return total / len(queries)


@pytest.mark.parametrize("match", ["exact", "any"])
def test_precision_at_k_matches_brute_force(match: str) -> None:
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((13, 6)).astype(np.float32)
    gallery = rng.standard_normal((70, 6)).astype(np.float32)
    ql = (rng.random((13, 3)) < 0.4).astype(np.float32)
    gl = (rng.random((70, 3)) < 0.4).astype(np.float32)
    out = precision_at_k(queries, gallery, ql, gl, ks=(1, 5, 10, 100), match=match, chunk=4)
    assert out["k_used"] == {"1": 1, "5": 5, "10": 10, "100": 70}
    for k in (1, 5, 10, 100):
        want = _brute_precision(queries, gallery, ql, gl, min(k, 70), match)
        assert out["precision"][str(k)] == pytest.approx(want, abs=1e-12)
    # P@all equals the share of relevant gallery items, which is also the chance level
    assert out["precision"]["100"] == pytest.approx(out["chance"])


def test_retrieval_uses_test_queries_and_train_gallery() -> None:
    features, labels, split = _synthetic()
    out = run_retrieval(features, labels, split, label_columns=["a", "b"], ks=(5,))
    assert (out["n_queries"], out["n_gallery"]) == (40, 320)
    assert out["match"] == "any"  # XR-0's relevance: a shared positive label
    # labels move the features, so neighbours agree more often than chance
    assert out["precision"]["5"] > out["chance"] + 0.1


# --- CLI ----------------------------------------------------------------------------------


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_writes_json_and_a_comparison_table(world) -> None:
    out, corpus = world["root"] / "eval", str(world["corpus"])
    encoders = [str(world["gray"]), f"rgb48={world['rgb']}"]
    labels = ["--label", "label_cardiomegaly", "--label", "label_pleural*"]
    printed = _cli(
        "evaluate", "probe", *encoders, "--corpus", corpus, *labels, "--out", str(out),
        "--fractions", "10%", "--fractions", "1", "--seeds", "2", "--max-epochs", "8",
    )  # fmt: skip
    assert "| encoder | pool | AUROC 10% | MCC 10% | AUROC 100% | MCC 100% |" in printed
    assert "| gray | cls |" in printed and "| rgb48 | cls |" in printed
    report = json.loads((out / "probe.json").read_text())
    assert [r["encoder"] for r in report["results"]] == ["gray", "rgb48"]
    for result in report["results"]:
        assert result["labels"] == ["label_cardiomegaly", "label_pleural_effusion"]
        assert list(result["fractions"]) == ["10%", "100%"]
        for cell in result["fractions"].values():
            assert len(cell["seeds"]) == 2
            for run in cell["seeds"]:
                assert set(run["auroc"]) == set(result["labels"])
                assert all(0 <= v <= 1 for v in run["auroc"].values())
        # every encoder is probed on the same training subsets
    sizes = [[c["n_train"] for c in r["fractions"].values()] for r in report["results"]]
    assert sizes[0] == sizes[1]
    assert "| gray | cls |" in (out / "probe.md").read_text()

    # Retrieval reuses the cached features (no new files, none rewritten).
    cached = {p: p.stat().st_mtime_ns for p in (out / "features").glob("*.npy")}
    assert len(cached) == 2
    printed = _cli("evaluate", "retrieval", *encoders, "--corpus", corpus, "--label", "label_*",
                   "--out", str(out))  # fmt: skip
    assert "| encoder | pool | P@5 | P@10 | P@100 | chance |" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "features").glob("*.npy")} == cached
    report = json.loads((out / "retrieval.json").read_text())
    assert [r["encoder"] for r in report["results"]] == ["gray", "rgb48"]
    for result in report["results"]:
        assert set(result["precision"]) == {"5", "10", "100"}
        assert all(0 <= v <= 1 for v in result["precision"].values())
    assert "| rgb48 | cls |" in (out / "retrieval.md").read_text()

    bad = CliRunner().invoke(app, ["evaluate", "probe", str(world["gray"]), "--corpus", corpus,
                                   "--label", "label_fracture"])  # fmt: skip
    assert bad.exit_code == 2
    bad = CliRunner().invoke(app, ["evaluate", "probe", str(world["gray"]), "--corpus", corpus,
                                   "--label", "label_*", "--protocol", "xr-0"])  # fmt: skip
    assert bad.exit_code == 2 and "protocol" in bad.output


# --- subgroup bias ------------------------------------------------------------------------


def _synthetic_groups(n: int = 240, *, seed: int = 0):
    """One label that shifts feature 0 strongly for F and weakly for M; five rows of unknown
    sex; 80/10/10 split."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 1)) < 0.4).astype(np.float32)
    groups = np.array(["F", "M"] * (n // 2), dtype=object)
    groups[:5] = None
    features = rng.standard_normal((n, 8)).astype(np.float32)
    features[:, 0] += np.where(groups == "F", 4.0, 0.5) * labels[:, 0]
    split = np.array(["train"] * (n * 8 // 10) + ["val"] * (n // 10) + ["test"] * (n // 10))
    return features, labels, split, groups


def _compared(result: dict, c: dict) -> tuple[list[float], list[float]]:
    """The two recorded score lists a comparison is about: scores[trained on][tested on]."""
    scores = result["scores"]
    if c["kind"] == "subgroup vs all":  # on subgroup a: trained on a vs trained on all
        return scores[c["a"]][c["a"]], scores["all"][c["a"]]
    return scores["all"][c["a"]], scores["all"][c["b"]]  # the all probe on a vs on b


def test_bias_statistics_equal_scipy_on_the_recorded_scores() -> None:
    from scipy.stats import mannwhitneyu

    features, labels, split, groups = _synthetic_groups()
    cfg = ProbeConfig(seeds=3, max_epochs=6)
    out = run_bias(features, labels, split, groups, label_columns=["label_a"], by="sex",
                   cfg=cfg, bootstrap=5)  # fmt: skip
    assert out["subgroups"] == ["F", "M"]
    assert out["n"]["all"]["train"] == 192 and out["n"]["F"]["train"] + out["n"]["M"]["train"] < 192
    kinds = [(c["kind"], c["a"], c["b"]) for c in out["comparisons"]]
    assert kinds == [("subgroup vs all", "F", "all"), ("subgroup vs all", "M", "all"),
                     ("between subgroups", "F", "M")]  # fmt: skip
    for c in out["comparisons"]:
        a, b = _compared(out, c)
        assert len(a) == len(b) == 3 * 5 == c["n_a"] == c["n_b"]
        expected = mannwhitneyu(a, b, alternative="two-sided")
        assert c["u"] == float(expected.statistic) and c["p"] == float(expected.pvalue)
    # The label is far easier to read for F: the shared probe scores F above M.
    between = out["comparisons"][2]
    assert between["median_a"] > between["median_b"] + 0.1 and between["p"] < 0.01
    assert out["notes"] == ["5 rows without sex: in the all probe's training only"]


def test_bias_scores_are_the_probes_trained_on_the_subgroup() -> None:
    """Without resampling, a score is the test AUROC of the yardstick's probe trained on the
    subgroup's train rows and early-stopped on its val rows."""
    from raydiology.evaluation.probe import predict, standardize

    features, labels, split, groups = _synthetic_groups()
    cfg = ProbeConfig(seeds=1, max_epochs=4)
    out = run_bias(features, labels, split, groups, label_columns=["label_a"], by="sex", cfg=cfg)
    x = standardize(features, np.flatnonzero(split == "train"))
    train, val, test = (np.flatnonzero((split == s) & (groups == "M")) for s in SPLITS)
    probe, _ = train_probe(x[train], labels[train], x[val], labels[val], task="multilabel",
                           cfg=cfg, seed=0)  # fmt: skip
    auroc = roc_auc_score(labels[test, 0], predict(probe, x[test], "multilabel")[:, 0])
    assert out["scores"]["M"]["M"] == [pytest.approx(auroc)]
    assert len(out["scores"]["all"]["F"]) == 1


def test_mann_whitney_handles_empty_and_tied_scores() -> None:
    from raydiology.evaluation.bias import mann_whitney

    assert mann_whitney([], [0.5])["u"] is None
    tied = mann_whitney([0.7, 0.7], [0.7, 0.7, 0.7])
    assert tied["u"] == 3.0 and tied["median_a"] == 0.7


def test_bias_cli_writes_json_table_and_figure(world) -> None:
    from scipy.stats import mannwhitneyu

    out, corpus = world["root"] / "bias", str(world["corpus"])
    printed = _cli(
        "evaluate", "bias", str(world["gray"]), "--corpus", corpus, "--label", "label_*",
        "--by", "sex", "--out", str(out), "--seeds", "2", "--bootstrap", "3", "--max-epochs", "3",
    )  # fmt: skip
    assert (
        "| encoder | tested on | n test | trained on subgroup | trained on all | U | p |" in printed
    )
    assert "| gray | sex=F |" in printed and "| gray | sex=M |" in printed
    (result,) = json.loads((out / "bias.json").read_text())["results"]
    assert result["by"] == "sex" and result["subgroups"] == ["F", "M"]
    assert set(result["scores"]) == {"all", "F", "M"}
    tested = [c for c in result["comparisons"] if c["u"] is not None]
    assert len(tested) >= 2  # at least two of the three have scores on both sides
    for c in tested:
        expected = mannwhitneyu(*_compared(result, c), alternative="two-sided")
        assert (c["u"], c["p"]) == (float(expected.statistic), float(expected.pvalue))
    assert (out / "bias.md").read_text().startswith("# bias")
    assert (out / "bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = CliRunner().invoke(app, ["evaluate", "bias", str(world["gray"]), "--corpus", corpus,
                                   "--label", "label_*", "--by", "race"])  # fmt: skip
    assert bad.exit_code == 2 and "--by" in bad.output


def test_bias_leaves_out_subgroups_without_rows_in_a_split() -> None:
    features, labels, split, groups = _synthetic_groups()
    groups[10:12] = "O"  # two train rows only
    cfg = ProbeConfig(seeds=1, max_epochs=1)
    out = run_bias(features, labels, split, groups, label_columns=["label_a"], by="sex", cfg=cfg)
    assert out["subgroups"] == ["F", "M"] and "sex=O left out: no val, test rows" in out["notes"]
    with pytest.raises(ValueError, match="no sex subgroup"):
        run_bias(features, labels, split, np.full(len(groups), None), label_columns=["label_a"],
                 by="sex", cfg=cfg)  # fmt: skip
