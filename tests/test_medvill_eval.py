"""MedViLL downstream evaluation: the retrieval candidate sets and metrics, and on a tiny
MedViLL trained in-process on phantoms: retrieval above the random baseline, and iterative
[MASK] decoding under the S2S mask that never reads the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raydiology.config import load_experiment
from raydiology.evaluation.medvill_eval import (
    candidate_metrics,
    candidate_sets,
    generate_ids,
    generate_on_split,
    iter_images,
    random_candidate_metrics,
    read_split,
    retrieval_on_split,
)
from raydiology.models.medvill import attention_mask

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "medvill.yaml"


def test_candidate_sets_are_seeded_and_hold_the_true_pair_once():
    sets = candidate_sets(250, 100, seed=3)
    assert sets.shape == (250, 100)
    assert torch.equal(sets, candidate_sets(250, 100, seed=3))  # deterministic
    assert not torch.equal(sets, candidate_sets(250, 100, seed=4))
    assert not torch.equal(sets, candidate_sets(250, 100, seed=3, direction=1))
    for i, row in enumerate(sets.tolist()):
        assert row.count(i) == 1 and len(set(row)) == 100 and min(row) >= 0 and max(row) < 250
    # the true pair is not always in one place (ties fall in random order)
    assert len({row.index(i) for i, row in enumerate(sets.tolist())}) > 50
    small = candidate_sets(30, 100)  # fewer items than candidates: every item, shuffled
    assert small.shape == (30, 30) and (small.sort(dim=1).values == torch.arange(30)).all()


def test_candidate_metrics_perfect_and_random_scorers():
    g = torch.Generator().manual_seed(0)
    relevant = torch.zeros(2000, 100, dtype=torch.bool)
    relevant[:, 0] = True
    relevant[1::2, 1:3] = True  # half the queries have 3 relevant candidates (same text)
    perfect = candidate_metrics(relevant.float(), relevant)
    assert perfect["MRR"] == 1.0 and perfect["Hit@5"] == 1.0 and perfect["Recall@5"] == 1.0
    assert perfect["Precision@5"] == pytest.approx((1 / 5 + 3 / 5) / 2)
    # random scores, and constant scores (ties keep the shuffled order), match the expectation
    shuffle = torch.rand(2000, 100, generator=g).argsort(dim=1)
    shuffled = relevant.gather(1, shuffle)
    expected = random_candidate_metrics(shuffled)
    for scores in (torch.rand(2000, 100, generator=g), torch.zeros(2000, 100)):
        measured = candidate_metrics(scores, shuffled)
        for key, value in expected.items():
            assert measured[key] == pytest.approx(value, abs=0.02), key
    assert expected["Recall@5"] == 0.05 and expected["Precision@5"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="relevant"):
        candidate_metrics(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))


def test_same_labels_compares_whole_rows_and_missing_equals_missing():
    from raydiology.evaluation.medvill_eval import same_labels

    nan = float("nan")
    labels = [[1, 0, nan], [1, 0, nan], [1, 0, 0], [0, 1, nan]]
    assert same_labels(labels).tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]


def test_mixed_mask_evaluates_deterministically_with_the_bi_mask():
    """`mixed` draws bi or s2s per pair in training; evaluation uses bi, as the official
    understanding tasks do at test time, so two evaluations give the same numbers."""
    from raydiology.config_base import from_dict
    from raydiology.evaluation.medvill_eval import evaluate_retrieval, pair_scores, visual_features
    from raydiology.models.medvill import MedViLLConfig, build_medvill

    cfg = from_dict(MedViLLConfig, {"attention": "mixed", "max_text_tokens": 16}, "model")
    torch.manual_seed(0)
    model = build_medvill(cfg, image_size=64, in_chans=1).eval()
    reports = ["The heart is enlarged.", "No pneumothorax.", "The lungs are clear.",
               "Small left pleural effusion.", "Support devices in place.", "Normal heart."]  # fmt: skip
    images = torch.randn(len(reports), 1, 64, 64)
    feats, positions = visual_features(model, images)
    texts = [model.tokenizer.encode(r) for r in reports]
    pairs = (
        torch.arange(len(reports)).repeat_interleave(len(reports)),
        torch.arange(len(reports)).repeat(len(reports)),
    )
    scores = pair_scores(model, feats, positions, texts, *pairs)
    assert torch.equal(scores, pair_scores(model, feats, positions, texts, *pairs))
    assert torch.equal(scores, pair_scores(model, feats, positions, texts, *pairs, scheme="bi"))
    # the mask matters: a random bi/s2s draw per pair would change these scores
    assert not torch.allclose(
        scores, pair_scores(model, feats, positions, texts, *pairs, scheme="s2s")
    )
    first = evaluate_retrieval(model, images, reports)
    assert first == evaluate_retrieval(model, images, reports) and first["attention"] == "bi"
    assert model.train().mask_scheme() == "mixed"  # training still draws per sample


RESOLUTION, IMAGES, STEPS = 32, 12, 120


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, data config, corpus): the smoke MedViLL (bar mask) trained in-process with
    plain AdamW on 12 phantoms, which the tests then evaluate on (they check the evaluation,
    not generalisation).

    Loss: its own objective (MLM + matching) plus a ranking loss over every (image, report)
    pair of the batch through the matching head: from scratch, the objective's binary
    matching stays at chance for hundreds of steps on CPU, the ranking signal leaves it in
    about a hundred (measured: retrieval MRR ~0.85 against ~0.26 random after 120 steps).
    One thread (for the module's tests): these tiny steps only lose time to a second one.
    """
    from raydiology.data.phantom import write_phantom_corpus
    from raydiology.data.pipeline import preprocess_batch, to_model_input
    from raydiology.registry import build_model, build_objective

    corpus = tmp_path_factory.mktemp("medvill_eval") / "phantoms"
    write_phantom_corpus(corpus, n=IMAGES, size=RESOLUTION, finding_prob=0.5, progress=False)
    exp = load_experiment(
        EXPERIMENT, profile="medvill_smoke",
        overrides=[f"data.resolution={RESOLUTION}", "model.dropout=0.0"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(exp.model, exp.data)
    objective = build_objective(exp.objective, model)
    columns = list(exp.objective.config.label_columns)
    table = read_split(corpus, None)
    rows = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
    pixels = preprocess_batch(rows, data=exp.data, label_columns=columns)
    reports = [str(r) for r in rows["report"]]
    batch = {
        "image": to_model_input(torch.from_numpy(pixels["image"]), exp.data, dtype=torch.float32),
        "report": reports,
        **{f"label:{c}": torch.from_numpy(pixels[c]) for c in columns},
    }
    texts = [model.tokenizer.encode(r) for r in reports]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(objective, batch, texts, steps=STEPS, generator=torch.Generator().manual_seed(0))
        yield model.eval(), exp.data, corpus
    finally:
        torch.set_num_threads(threads)


def _train(objective, batch, texts, *, steps, generator):
    import torch.nn.functional as F

    model = objective.model
    n = len(texts)
    image_index = torch.arange(n).repeat_interleave(n)  # all pairs, row-major
    text_index = torch.arange(n).repeat(n)
    target = torch.arange(n)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = objective(batch, generator=generator)["loss"]
        feats, positions = model.visual_tokens(batch["image"])
        hidden, segments, _ = model.joint(
            feats[image_index], positions[image_index], [texts[j] for j in text_index]
        )
        logits = model.itm_head(model.pooled(hidden, segments))
        scores = (logits[:, 1] - logits[:, 0]).view(n, n)
        loss = loss + F.cross_entropy(scores, target) + F.cross_entropy(scores.t(), target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()


def test_retrieval_beats_the_random_baseline(trained):
    model, data, corpus = trained
    result = retrieval_on_split(model, corpus, data, split=None, candidates=100, seed=0,
                                relevance="text")  # fmt: skip
    print("MedViLL smoke retrieval:", result)
    assert result["n"] == IMAGES and result["candidates"] == IMAGES  # min(100, split size)
    assert result["attention"] == "bar"  # the model's own mask by default
    for direction in ("image_to_report", "report_to_image"):
        measured, chance = result[direction], result["random"][direction]
        assert measured["MRR"] >= 2 * chance["MRR"], (direction, measured, chance)
        assert measured["Hit@5"] > chance["Hit@5"], (direction, measured, chance)
    again = retrieval_on_split(model, corpus, data, split=None, candidates=100, seed=0,
                               relevance="text")  # fmt: skip
    assert again == result  # same candidate sets, same scores
    assert result["relevance"] == "text"


def test_retrieval_by_labels_counts_every_report_with_the_query_s_labels(trained):
    from raydiology.data.phantom import LABEL_COLUMNS

    model, data, corpus = trained
    by_text = retrieval_on_split(model, corpus, data, split=None, relevance="text")
    by_labels = retrieval_on_split(model, corpus, data, split=None, label_columns=LABEL_COLUMNS)
    assert by_labels["relevance"] == "labels" and by_text["relevance"] == "text"
    # the paper's relevance (same labels) is the default, with the objective's label columns
    assert retrieval_on_split(model, corpus, data, split=None) == by_labels
    table = read_split(corpus, None)
    labels = [tuple(table.column(c)[i].as_py() for c in LABEL_COLUMNS)
              for i in range(table.num_rows)]  # fmt: skip
    reports = table.column("report").to_pylist()
    # same text implies same labels, so labels relevance has at least as many positives
    assert all(labels[i] == labels[j] for i in range(len(reports)) for j in range(len(reports))
               if reports[i] == reports[j])  # fmt: skip
    for direction in ("image_to_report", "report_to_image"):
        assert (by_labels["random"][direction]["Precision@5"]
                >= by_text["random"][direction]["Precision@5"])  # fmt: skip
    with pytest.raises(ValueError, match="label_nope"):
        retrieval_on_split(model, corpus, data, split=None, label_columns=["label_nope"])


def test_generation_decodes_under_s2s_from_its_own_words_only(trained, tmp_path):
    from raydiology.evaluation.report_eval import read_predictions

    model, data, corpus = trained
    tok = model.tokenizer
    calls: list[tuple[str | None, list[list[int]]]] = []
    masks: list[tuple[torch.Tensor, torch.Tensor]] = []
    joint = model.joint

    def spy(feats, positions, texts, *, scheme=None, generator=None):
        calls.append((scheme, [list(t) for t in texts]))
        hidden, segments, ids = joint(feats, positions, texts, scheme=scheme, generator=generator)
        masks.append((captured.pop(), segments))
        return hidden, segments, ids

    captured: list[torch.Tensor] = []
    hook = model.bert.encoder.register_forward_pre_hook(
        lambda _, args, kwargs: captured.append(kwargs["attention_mask"]), with_kwargs=True
    )
    model.joint = spy
    try:
        rows = generate_on_split(model, corpus, data, split=None, limit=6, batch_size=4,
                                 max_tokens=12, out=tmp_path / "predictions.jsonl")  # fmt: skip
        garbage = generate_on_split(model, corpus, data, split=None, limit=6, batch_size=4,
                                    max_tokens=12, report_column="view")  # fmt: skip
    finally:
        del model.joint
        hook.remove()
    print("MedViLL smoke generation:", rows[:2])
    # the predictions JSONL that `raydiology eval` reads
    assert read_predictions(tmp_path / "predictions.jsonl") == rows and len(rows) == 6
    table = read_split(corpus, None, limit=6)
    assert [r["id"] for r in rows] == table.column("image_id").to_pylist()
    assert all(r["prediction"] for r in rows)
    # the reference is never read for decoding: garbage references, same predictions
    assert [r["prediction"] for r in garbage] == [r["prediction"] for r in rows]
    assert [r["reference"] for r in garbage] != [r["reference"] for r in rows]
    # every step feeds the words decoded so far + one [MASK], under the S2S mask
    first = calls[: len(calls) // 2]
    assert all(scheme == "s2s" for scheme, _ in calls)
    assert all(t[-1] == tok.mask_id and tok.mask_id not in t[:-1] for _, ts in first for t in ts)
    ((_, images),) = list(iter_images(table, data, batch_size=6, device=torch.device("cpu")))
    predicted = generate_ids(model, images, max_tokens=12, batch_size=4)
    assert [tok.decode(p) for p in predicted] == [r["prediction"] for r in rows]
    for _, texts in first:
        for t in texts:  # the words fed are a prefix of some image's own final prediction
            assert any(p[: len(t) - 1] == t[:-1] for p in predicted)
    for additive, segments in masks:
        expected = attention_mask("s2s", segments)
        assert torch.equal(additive[:, 0] == 0, expected)
        assert not torch.equal(expected, attention_mask("bar", segments))


def test_cli_loads_the_export_and_writes_retrieval_and_predictions(trained, tmp_path):
    import json

    from typer.testing import CliRunner

    from raydiology.cli import app
    from raydiology.evaluation.medvill_eval import retrieval_on_split
    from raydiology.evaluation.report_eval import read_predictions
    from raydiology.objectives.medvill import MedViLLObjective, MedViLLObjectiveConfig
    from raydiology.train.export import export_encoder

    model, data, corpus = trained
    exp = load_experiment(
        EXPERIMENT, profile="medvill_smoke",
        overrides=[f"data.resolution={RESOLUTION}", "model.dropout=0.0"],
    )  # fmt: skip
    objective = MedViLLObjective(MedViLLObjectiveConfig(), model)
    export_encoder(objective, tmp_path / "run" / "export", exp=exp, corpus_sha256=None, step=1)
    objective.export_extra(tmp_path / "run" / "export", write=True, gather=False)

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "medvill-retrieval", str(tmp_path / "run"),
                                 "--corpus", str(corpus), "--split", "all"])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "run" / "eval" / "medvill_retrieval.json").read_text())
    expected = retrieval_on_split(model, corpus, data, split=None)
    for direction in ("image_to_report", "report_to_image"):
        for key, value in expected[direction].items():
            assert written[direction][key] == pytest.approx(value, abs=1e-6), (direction, key)
    assert written["relevance"] == "labels"  # the paper's, by default
    by_text = runner.invoke(app, ["evaluate", "medvill-retrieval", str(tmp_path / "run"),
                                  "--corpus", str(corpus), "--split", "all",
                                  "--relevance", "text", "--out", str(tmp_path / "t.json")])  # fmt: skip
    assert by_text.exit_code == 0, by_text.output
    assert json.loads((tmp_path / "t.json").read_text())["relevance"] == "text"

    out = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["evaluate", "medvill-generate", str(tmp_path / "run"),
                                 "--corpus", str(corpus), "--split", "all", "--limit", "3",
                                 "--max-tokens", "5", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = read_predictions(out)
    assert len(rows) == 3 and all(0 < len(r["prediction"].split()) <= 5 for r in rows)
    missing = runner.invoke(app, ["evaluate", "medvill-generate", str(tmp_path / "nothing"),
                                  "--corpus", str(corpus)])  # fmt: skip
    assert missing.exit_code == 2 and "no MedViLL export" in " ".join(missing.output.split())
