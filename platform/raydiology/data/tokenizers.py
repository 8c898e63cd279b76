"""Report tokenizers as an experiment component: trained from report text or loaded from disk.

A report generator's vocabulary is part of the experiment (a sweep may vary it), so it is
named in the experiment file (`model.tokenizer`) and saved with the run. Four kinds are
trained with the Hugging Face `tokenizers` library, none hand-written:

- ``word``: R2Gen's vocabulary — reports cleaned (`clean_report`: lowercase, punctuation
  dropped, " . " between sentences), split on whitespace, words seen fewer than `min_freq`
  times (3 for IU X-ray, 10 for MIMIC-CXR) become ``<unk>``;
- ``wordpiece`` (BERT), ``bpe`` (byte-level, GPT-2 style) and ``unigram`` (SentencePiece's
  unigram model, via the library's Unigram trainer) at a chosen vocabulary size;
- ``pretrained``: a tokenizer folder a user already has (e.g. next to a Llama checkpoint),
  read with `AutoTokenizer(local_files_only=True)`; nothing is ever downloaded. A folder that
  holds only a SentencePiece ``tokenizer.model`` (Meta's Llama-2 download) is converted from
  the model's protobuf, which needs `protobuf`, not the `sentencepiece` package.

Every kind ends up as a `transformers.PreTrainedTokenizerFast` inside `ReportTokenizer`, which
adds what report generation needs on top: the cleaning step and the ids of BOS/EOS/PAD.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raydiology.config_base import check, from_dict, to_dict
from raydiology.data.reports import CleanStyle

TokenizerKind = Literal["word", "wordpiece", "bpe", "unigram", "pretrained"]
TRAINED_KINDS = ("word", "wordpiece", "bpe", "unigram")
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
META_FILE = "raydiology_tokenizer.json"  # our settings, beside the Hugging Face files
SENTENCEPIECE_FILE = "tokenizer.model"  # a SentencePiece model (Llama-2's only tokenizer file)


@dataclass(kw_only=True)
class TokenizerConfig:
    """The `tokenizer` entry of a report model (e.g. ``model.tokenizer``)."""

    kind: TokenizerKind = "word"
    # A saved tokenizer folder: required for `pretrained`; for a trained kind, a folder saved
    # earlier by `ReportTokenizer.save` (the run's own export, say) is loaded instead of training.
    path: str | None = None
    # What a trained kind learns from: "phantom" (the built-in phantom reports), "openi"
    # (torchxrayvision's Open-I/IU X-ray reports), a corpus folder (its `report` column, train
    # split), a .txt file (one report a line) or a .jsonl file with a "report" field.
    train_reports: str = "phantom"
    max_reports: int | None = None  # cap on training texts (phantom: 400 when null)
    vocab_size: int = 8000  # target for wordpiece/bpe/unigram, upper bound for word
    min_freq: int = 3  # R2Gen's threshold: 3 for IU X-ray, 10 for MIMIC-CXR
    clean: CleanStyle | None = (
        "iu"  # R2Gen's cleaning (data/reports.py) before tokenizing; null = none
    )
    lowercase: bool = True  # trained kinds only

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            self.kind != "pretrained" or self.path is not None,
            f"{k}path",
            self.path,
            "a local tokenizer folder (kind: pretrained reads one, it never downloads)",
        )
        check(self.vocab_size >= 8, f"{k}vocab_size", self.vocab_size, "at least 8")
        check(self.min_freq >= 1, f"{k}min_freq", self.min_freq, "at least 1")
        check(
            self.max_reports is None or self.max_reports >= 1,
            f"{k}max_reports",
            self.max_reports,
            "at least 1 or null",
        )


class ReportTokenizer:
    """A fast Hugging Face tokenizer plus the report-side settings (cleaning, special ids)."""

    def __init__(self, hf: Any, *, config: TokenizerConfig) -> None:
        self.hf = hf  # transformers.PreTrainedTokenizerFast
        self.config = config
        unk = hf.unk_token_id
        eos = hf.eos_token_id
        if eos is None:
            raise ValueError("a report tokenizer needs an end-of-sequence token (eos_token)")
        # GPT-2 and Qwen2 tokenizers have no BOS or PAD of their own: reuse EOS, as they do.
        self.eos_id: int = int(eos)
        self.bos_id: int = int(hf.bos_token_id if hf.bos_token_id is not None else eos)
        self.pad_id: int = int(hf.pad_token_id if hf.pad_token_id is not None else eos)
        self.unk_id: int | None = None if unk is None else int(unk)

    @property
    def vocab_size(self) -> int:
        """Ids run 0..vocab_size-1 (added tokens included)."""
        return len(self.hf)

    def prepare(self, text: str) -> str:
        """The text as the tokenizer sees it: R2Gen-cleaned when `clean` is set."""
        from raydiology.data.reports import clean_report

        return clean_report(text, style=self.config.clean) if self.config.clean else text

    def encode(self, text: str, *, clean: bool = True) -> list[int]:
        """Token ids without special tokens; `clean=False` for prompts, which are not reports."""
        return list(self.hf.encode(self.prepare(text) if clean else text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True)).strip()

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        meta = {"format": "raydiology-tokenizer/1", "config": to_dict(self.config)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, config: TokenizerConfig | None = None) -> ReportTokenizer:
        """A folder written by `save`, or any local Hugging Face tokenizer folder."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        if (folder / SENTENCEPIECE_FILE).is_file() and not (folder / "tokenizer.json").is_file():
            hf = sentencepiece_tokenizer(folder)
        else:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if config is None:
            meta = folder / META_FILE
            if meta.is_file():
                saved = json.loads(meta.read_text())["config"]
                config = from_dict(TokenizerConfig, {**saved, "path": str(folder)}, "tokenizer")
            else:  # someone else's tokenizer: no R2Gen cleaning unless asked for
                config = TokenizerConfig(kind="pretrained", path=str(folder), clean=None)
        return cls(hf, config=config)


def sentencepiece_tokenizer(folder: Path) -> Any:
    """A fast tokenizer from a folder's SentencePiece `tokenizer.model` (BPE or unigram).

    transformers only converts such a file with the `sentencepiece` package installed; the file
    is a protobuf message, so this parses it with `protobuf` and builds the same backend
    (normaliser, dummy prefix, byte fallback, merges ranked by piece score) that transformers
    builds for a SentencePiece model it has no tokenizer class for. Special tokens come from
    the model, then `special_tokens_map.json` / `tokenizer_config.json` where present.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
    except ImportError as e:
        raise ImportError(
            f"{folder}: reading {SENTENCEPIECE_FILE} needs the `protobuf` package "
            f"(or `sentencepiece`): {e}"
        ) from e
    build = getattr(SpmConverter, "build_tokenizer_from_spm_proto", None)
    if build is None:
        raise ImportError(
            f"{folder}: {SENTENCEPIECE_FILE} alone needs transformers >= 5 to convert; "
            "or save the tokenizer with tokenizer.json"
        )
    proto.ParseFromString((folder / SENTENCEPIECE_FILE).read_bytes())
    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    spec = proto.trainer_spec
    if spec.model_type == 1:  # unigram: pieces with scores
        vocab: Any = pieces
    elif spec.model_type == 2:  # BPE: pieces by id, merges ranked by score
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    else:
        raise ValueError(
            f"{folder / SENTENCEPIECE_FILE}: SentencePiece model type {spec.model_type} "
            "(word/char) is not supported; BPE and unigram are"
        )
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (folder / name).is_file():
            settings.update(json.loads((folder / name).read_text()))
    backend = build(proto=proto, vocab=vocab, legacy=bool(settings.get("legacy", True)))
    specials = {
        f"{role}_token": piece
        for role, index, piece in (
            ("unk", spec.unk_id, spec.unk_piece),
            ("bos", spec.bos_id, spec.bos_piece),
            ("eos", spec.eos_id, spec.eos_piece),
            ("pad", spec.pad_id, spec.pad_piece),
        )
        if 0 <= index < len(pieces)
    }
    for key in ("unk_token", "bos_token", "eos_token", "pad_token"):
        token = settings.get(key)
        if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
            token = token.get("content")
        if isinstance(token, str):
            specials[key] = token
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def build_tokenizer(cfg: TokenizerConfig) -> ReportTokenizer:
    """Load `cfg.path` when given, else train `cfg.kind` on `cfg.train_reports`."""
    if cfg.path is not None:
        saved = (Path(cfg.path) / META_FILE).is_file()
        # a folder we saved carries its own settings; anyone else's takes the experiment's
        return ReportTokenizer.load(cfg.path, config=None if saved else cfg)
    return _same_on_every_rank(
        lambda: train_tokenizer(cfg, report_texts(cfg.train_reports, limit=cfg.max_reports)), cfg
    )


def _same_on_every_rank(train: Any, cfg: TokenizerConfig) -> ReportTokenizer:
    """Rank 0 trains, the other training workers receive its tokenizer.

    Training is not repeatable across processes for every kind (the wordpiece and unigram
    trainers break ties at the vocabulary cut-off in hash-map order, the unigram EM's scores
    vary in their last bits), and a model whose ranks disagree on ids would train on garbage. Outside a process group this just trains.
    """
    from raydiology.train import collectives

    if not collectives.active():
        return train()
    payload = collectives.broadcast_object(
        train().hf.backend_tokenizer.to_str() if collectives.rank() == 0 else None
    )
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(payload), **SPECIAL_TOKENS)
    return ReportTokenizer(hf, config=cfg)


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> ReportTokenizer:
    """Train a `word` / `wordpiece` / `bpe` / `unigram` tokenizer on report texts.

    Deterministic: the same texts and settings give the same vocabulary, so every training
    worker that trains its own copy gets identical ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if cfg.kind not in TRAINED_KINDS:
        raise ValueError(f"tokenizer kind {cfg.kind!r} is loaded from a folder, not trained")
    from raydiology.data.reports import clean_report

    corpus = [clean_report(t, style=cfg.clean) if cfg.clean else t for t in texts if t.strip()]
    if not corpus:
        raise ValueError("no report texts to train a tokenizer on")
    specials = list(SPECIAL_TOKENS.values())
    unk = SPECIAL_TOKENS["unk_token"]
    tokenizer: Any
    trainer: Any
    if cfg.kind == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_freq,
            special_tokens=specials,
            show_progress=False,
        )
    elif cfg.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=unk))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.decoder = decoders.WordPiece(cleanup=False)
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_freq,
            special_tokens=specials,
            show_progress=False,
        )
    elif cfg.kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_freq,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:  # unigram, SentencePiece style: "▁" marks word starts, so spaces round-trip
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size, special_tokens=specials, unk_token=unk, show_progress=False
        )
    if cfg.lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=_canonical_ids(tokenizer), **SPECIAL_TOKENS)
    return ReportTokenizer(hf, config=cfg)


def _canonical_ids(tokenizer: Any) -> Any:
    """The same vocabulary with ids in a fixed order: special tokens first, then words by
    text (R2Gen sorts its word list too) or unigram pieces by score.

    The trainers break frequency ties in hash-map order, which changes from one process to
    the next; training workers that each train a copy must agree on every id.
    """
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    model = state["model"]
    specials = list(SPECIAL_TOKENS.values())
    if model["type"] in ("WordLevel", "WordPiece"):
        rest = sorted(t for t in model["vocab"] if t not in specials)
        model["vocab"] = {t: i for i, t in enumerate([*specials, *rest])}
    elif model["type"] == "Unigram":
        scores = dict(model["vocab"])
        rest = sorted((t for t in scores if t not in specials), key=lambda t: (-scores[t], t))
        model["vocab"] = [[t, scores[t]] for t in [*specials, *rest]]
        model["unk_id"] = specials.index(SPECIAL_TOKENS["unk_token"])
    else:  # BPE: ids follow its merges, which the trainer orders deterministically
        return tokenizer
    return Tokenizer.from_str(json.dumps(state))


def report_texts(source: str, *, limit: int | None = None) -> list[str]:
    """Report texts from a named source (see `TokenizerConfig.train_reports`)."""
    texts: list[str]
    if source == "phantom":
        texts = _phantom_reports(limit or 400)
    elif source == "openi":
        from raydiology.data.reports import read_openi

        texts = [r.report for r in read_openi() if r.report]
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            texts = _corpus_reports(path)
        elif path.suffix == ".jsonl":
            rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            texts = [str(row["report"]) for row in rows]
        elif path.suffix == ".txt":
            texts = [line for line in path.read_text().splitlines() if line.strip()]
        else:
            raise FileNotFoundError(
                f"tokenizer.train_reports: {source!r} is not 'phantom', 'openi', a corpus "
                "folder, a .txt or a .jsonl file"
            )
    return texts[:limit] if limit is not None else texts


def _phantom_reports(n: int) -> list[str]:
    """Reports of the built-in phantom generator (findings at 50% so every template shows)."""
    import numpy as np

    from raydiology.data.phantom import make_phantom

    return [
        make_phantom(np.random.default_rng([0, i]), size=16, finding_prob=0.5).report
        for i in range(n)
    ]


def _corpus_reports(folder: Path) -> list[str]:
    """The `report` column of a corpus's train split (all rows if it has no `split`)."""
    from raydiology.data.corpus import read_manifest, read_rows

    columns = read_manifest(folder).columns
    if "report" not in columns:
        raise ValueError(f"corpus {folder} has no `report` column to train a tokenizer on")
    table = read_rows(folder, ["report", "split"] if "split" in columns else ["report"])
    reports = table.column("report").to_pylist()
    splits = table.column("split").to_pylist() if "split" in columns else ["train"] * len(reports)
    return [r for r, s in zip(reports, splits, strict=True) if r and s == "train"]
