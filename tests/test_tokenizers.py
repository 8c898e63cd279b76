"""Report tokenizers: each kind trains on real reports (Open-I), round-trips text, saves and
reloads; the experiment-file entry builds, loads and validates."""

from __future__ import annotations

import importlib.util

import pytest

from raydiology.config_base import ConfigError, from_dict
from raydiology.data.reports import clean_report
from raydiology.data.tokenizers import (
    ReportTokenizer,
    TokenizerConfig,
    build_tokenizer,
    report_texts,
    train_tokenizer,
)

KINDS = ("word", "wordpiece", "bpe", "unigram")


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def openi_reports() -> list[str]:
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed: its bundled Open-I reports are the corpus")
    texts = report_texts("openi")
    assert len(texts) > 3000
    return texts


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_on_openi_round_trips_and_reloads(kind, openi_reports, tmp_path):
    # min_freq 1: every training word is in the vocabulary, so cleaned text round-trips
    cfg = TokenizerConfig(kind=kind, vocab_size=3000, min_freq=1, clean="iu")
    tok = train_tokenizer(cfg, openi_reports)
    assert 100 < tok.vocab_size <= 3000 if kind != "word" else tok.vocab_size > 1000
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    sample = openi_reports[:200]
    for text in sample:
        ids = tok.encode(text)
        assert tok.unk_id not in ids, (kind, text)
        # R2Gen's cleaning keeps empty sentences ("x .  ."): word-level splitting loses the
        # double space, byte-level BPE keeps it; the words round-trip either way
        assert squash(tok.decode(ids)) == squash(clean_report(text, style="iu"))
    # subword kinds split words; word-level maps one word to one id
    words = sum(len(clean_report(t, style="iu").split()) for t in sample)
    pieces = sum(len(tok.encode(t)) for t in sample)
    assert pieces == words if kind == "word" else pieces >= words

    folder = tok.save(tmp_path / kind)
    again = ReportTokenizer.load(folder)
    assert again.config.kind == kind and again.config.clean == "iu"
    assert again.vocab_size == tok.vocab_size
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert all(again.encode(t) == tok.encode(t) for t in sample)
    # built from an experiment entry naming the folder, as a later run would
    assert build_tokenizer(TokenizerConfig(kind=kind, path=str(folder))).encode(
        sample[0]
    ) == tok.encode(sample[0])


@pytest.mark.parametrize("kind", ("word", "bpe"))
def test_training_is_deterministic(kind, openi_reports):
    # ids in a fixed order (frequency ties are broken in hash order inside the trainers).
    # The wordpiece and unigram trainers can pick different pieces at the vocabulary cut-off
    # from one process to the next, so training workers take rank 0's tokenizer
    # (`_same_on_every_rank`) rather than rely on this
    cfg = TokenizerConfig(kind=kind, vocab_size=1000, min_freq=2)
    a, b = train_tokenizer(cfg, openi_reports[:800]), train_tokenizer(cfg, openi_reports[:800])
    assert a.hf.get_vocab() == b.hf.get_vocab()


def test_word_level_threshold_maps_rare_words_to_unk(openi_reports):
    """R2Gen's vocabulary: words seen fewer than min_freq times (3 for IU) become <unk>."""
    from collections import Counter

    counts = Counter(w for t in openi_reports for w in clean_report(t, style="iu").split())
    tok = train_tokenizer(
        TokenizerConfig(kind="word", min_freq=3, vocab_size=100_000), openi_reports
    )
    vocab = tok.hf.get_vocab()
    kept = {w for w, c in counts.items() if c >= 3}
    assert kept <= set(vocab)
    assert len(vocab) == len(kept) + 4  # + <pad> <unk> <s> </s>
    rare = next(w for w, c in counts.items() if c == 1)
    assert tok.encode(f"the {rare} is normal") == [
        vocab["the"], tok.unk_id, vocab["is"], vocab["normal"], vocab["."]
    ]  # fmt: skip


def test_phantom_corpus_and_text_files_as_sources(tmp_path):
    import json

    from raydiology.data.phantom import write_phantom_corpus

    write_phantom_corpus(tmp_path / "corpus", n=24, size=16, progress=False)
    from_corpus = report_texts(str(tmp_path / "corpus"))
    assert 10 < len(from_corpus) < 24  # the train split only
    assert all(t.startswith("FINDINGS:") for t in from_corpus)
    (tmp_path / "r.jsonl").write_text(
        "".join(json.dumps({"report": t}) + "\n" for t in from_corpus)
    )
    (tmp_path / "r.txt").write_text("\n".join(from_corpus))
    assert report_texts(str(tmp_path / "r.jsonl")) == report_texts(str(tmp_path / "r.txt"))
    tok = build_tokenizer(
        TokenizerConfig(kind="bpe", vocab_size=300, train_reports=str(tmp_path / "r.txt"))
    )
    assert squash(tok.decode(tok.encode(from_corpus[0]))) == squash(
        clean_report(from_corpus[0], style="iu")
    )


def test_pretrained_kind_reads_a_local_hugging_face_folder(tmp_path):
    """Someone else's tokenizer (no raydiology settings file) loads with the entry's settings."""
    tok = train_tokenizer(
        TokenizerConfig(kind="bpe", vocab_size=300), report_texts("phantom", limit=50)
    )
    tok.hf.save_pretrained(str(tmp_path / "hf"))  # only the Hugging Face files
    cfg = from_dict(
        TokenizerConfig, {"kind": "pretrained", "path": str(tmp_path / "hf"), "clean": None}, "t"
    )
    loaded = build_tokenizer(cfg)
    assert loaded.config.kind == "pretrained" and loaded.config.clean is None
    text = "The heart is enlarged."
    assert loaded.decode(loaded.encode(text)) == text.lower()  # lowercase normaliser kept


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        from_dict(TokenizerConfig, {"kind": "pretrained"}, "model.tokenizer")
    assert err.value.key == "model.tokenizer.path"
    with pytest.raises(ConfigError) as err:
        from_dict(TokenizerConfig, {"kind": "sentencepiece"}, "model.tokenizer")
    assert err.value.key == "model.tokenizer.kind"
    with pytest.raises(FileNotFoundError, match="train_reports"):
        build_tokenizer(TokenizerConfig(train_reports="/no/such/reports.csv"))
