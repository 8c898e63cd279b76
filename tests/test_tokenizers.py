"""Report tokenizers: each kind trains on real reports (Open-I), round-trips text, saves and
reloads; the experiment-file entry builds, loads and validates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


# ----------------------------------------------------------------------------- SentencePiece


def _stage3_tokenizer(folder, tmp_path) -> ReportTokenizer:
    """The tokenizer the experiment file builds when `model.tokenizer` names `folder`."""
    from pathlib import Path

    from raydiology.config import load_experiment

    stage3 = Path(__file__).resolve().parents[1] / "experiments/mambaxray_vl/stage3_sft.yaml"
    section = f"model.tokenizer={{kind: pretrained, path: '{folder}', clean: null}}"
    exp = load_experiment(stage3, profile="sft_smoke", overrides=[section])  # validates it too
    return build_tokenizer(exp.model.config.tokenizer)


def _write_unigram_model(path, tok: ReportTokenizer) -> None:
    """A SentencePiece `tokenizer.model` (its protobuf, written without the sentencepiece
    package) holding a unigram vocabulary that the `tokenizers` library trained."""
    import json

    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    model = pb.ModelProto()
    kinds = {"<unk>": 2, "<s>": 3, "</s>": 3, "<pad>": 3}  # UNKNOWN, CONTROL; NORMAL = 1
    for piece, score in json.loads(tok.hf.backend_tokenizer.to_str())["model"]["vocab"]:
        model.pieces.add(piece=piece, score=score, type=kinds.get(piece, 1))
    names = [p.piece for p in model.pieces]
    spec = model.trainer_spec
    spec.model_type = 1  # UNIGRAM
    spec.unk_id, spec.bos_id = names.index("<unk>"), names.index("<s>")
    spec.eos_id, spec.pad_id = names.index("</s>"), names.index("<pad>")
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", True
    norm.remove_extra_whitespaces, norm.escape_whitespaces = True, True
    path.write_bytes(model.SerializeToString())


def test_a_folder_with_only_a_sentencepiece_model_loads(tmp_path):
    """Llama-2's download carries `tokenizer.model` and no `tokenizer.json`; it converts
    without the sentencepiece package (the file is parsed with protobuf)."""
    pytest.importorskip("google.protobuf", reason="tokenizer.model is a protobuf message")
    texts = report_texts("phantom", limit=100)
    cfg = TokenizerConfig(kind="unigram", vocab_size=300, clean=None, lowercase=False)
    source = train_tokenizer(cfg, texts)
    folder = tmp_path / "llama"
    folder.mkdir()
    _write_unigram_model(folder / "tokenizer.model", source)
    tok = _stage3_tokenizer(folder, tmp_path)
    assert tok.config.kind == "pretrained" and tok.config.clean is None
    assert tok.vocab_size == source.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (source.bos_id, source.eos_id, source.pad_id)
    for text in texts[:20]:
        ids = tok.encode(text)
        assert ids == source.encode(text)  # the same pieces as the vocabulary's own tokenizer
        assert tok.decode(ids) == text  # cased text and its spacing round-trip
    # special tokens named beside the model win over the model's own
    (folder / "special_tokens_map.json").write_text('{"pad_token": {"content": "</s>"}}')
    assert build_tokenizer(tok.config).pad_id == tok.eos_id
    # saved as a run exports it (tokenizer.json now), it reloads with the same ids
    again = ReportTokenizer.load(tok.save(tmp_path / "saved"))
    assert again.encode(texts[0]) == tok.encode(texts[0])


def test_llama_style_bpe_sentencepiece_model_with_byte_fallback(tmp_path):
    """Llama-2's kind of model: BPE pieces scored by merge rank, 256 byte pieces, byte
    fallback. Written as protobuf from a `tokenizers` BPE, it must split text into the same
    pieces, and characters it has no piece for travel as bytes and decode back."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import import_protobuf

    texts = report_texts("phantom", limit=200)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    state = json.loads(bpe.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in state["merges"]]
    pb = import_protobuf()
    model = pb.ModelProto()
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        model.pieces.add(piece=piece, score=0.0, type=kind)
    for byte in range(256):
        model.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=6)  # BYTE
    rank = [a + b for a, b in merges] + [p for p in state["vocab"] if len(p) == 1]
    for i, piece in enumerate(rank):
        model.pieces.add(piece=piece, score=-float(i), type=1)
    spec = model.trainer_spec
    spec.model_type, spec.byte_fallback = 2, True  # BPE
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.escape_whitespaces = True
    model.normalizer_spec.remove_extra_whitespaces = False
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    (folder / "tokenizer_config.json").write_text('{"legacy": false, "bos_token": "<s>"}')
    tok = _stage3_tokenizer(folder, tmp_path)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)  # no pad: EOS
    pieces = [p.piece for p in model.pieces]
    for text in texts[:30]:
        ids = tok.encode(text)
        assert [pieces[i] for i in ids] == bpe.encode(text).tokens
        assert tok.decode(ids) == text
    ids = tok.encode("Unseen: × 2!")
    assert [pieces[i] for i in ids][-5:] == ["<0xC3>", "<0x97>", "▁", "2", "<0x21>"]
    assert tok.decode(ids) == "Unseen: × 2!"


def test_sentencepiece_trained_bpe_model_matches_sentencepiece(tmp_path):
    """A Llama-style SentencePiece BPE model (byte fallback) trained by SentencePiece itself:
    only tokenizer.model in the folder; ids equal SentencePieceProcessor's."""
    spm = pytest.importorskip(
        "sentencepiece",
        reason="training a real SentencePiece model needs the sentencepiece package",
    )
    texts = report_texts("phantom", limit=300)
    corpus = tmp_path / "reports.txt"
    corpus.write_text("\n".join(texts) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )  # fmt: skip
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    tok = _stage3_tokenizer(folder, tmp_path)
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tok.vocab_size == processor.get_piece_size()
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in [*texts[:20], "Unseen words: pneumoperitoneum × 2!"]:
        ids = tok.encode(text)
        assert ids == processor.encode(text), text
        assert tok.decode(ids) == processor.decode(ids) == text


def test_a_run_trains_its_tokenizer_once_and_every_build_reads_it(tmp_path):
    """WordPiece training differs between processes (ties at the vocabulary cut-off), so a
    run pins its tokenizer in the run directory: a resume or a later load gets the same ids."""
    from rich.console import Console

    from raydiology.config import load_experiment
    from raydiology.models.clip import build_text_tokenizer
    from raydiology.train.launch import pin_tokenizer

    repo = Path(__file__).resolve().parents[1]

    def pinned():
        exp = load_experiment(
            repo / "experiments/mambaxray_vl/stage2_clip.yaml", profile="clip_smoke"
        )
        pin_tokenizer(exp, tmp_path, console=Console(quiet=True))
        return exp.model.config.text

    first = pinned()
    assert first.tokenizer.path == str(tmp_path / "tokenizer")
    saved = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "tokenizer").iterdir())
    again = pinned()  # the resumed run: loads, does not train again
    assert (
        sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "tokenizer").iterdir()) == saved
    )
    vocab = build_text_tokenizer(first).hf.get_vocab()
    assert build_text_tokenizer(again).hf.get_vocab() == vocab
