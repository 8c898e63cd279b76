"""Label reports with a CheXbert checkpoint (Smit et al. 2020), read offline.

Why a reader of our own: the maintained packages that wrap CheXbert (`f1chexbert`, `radgraph`,
`radeval`) each fetch weights from the Hugging Face Hub and the `bert-base-uncased` tokenizer at
construction, take no local path for either, and `radeval` pulls in a large stack (stanza,
medspacy, datasets, accelerate). Evaluation here must run without a network, so this module
reads the published checkpoint format itself:

- the file `torch.save`s a dict whose `model_state_dict` holds a `BertModel` (keys `bert.*`) and
  14 linear heads on the [CLS] vector (`linear_heads.<i>.weight/bias`), keys prefixed
  `module.` (it was saved from `nn.DataParallel`); a bare state dict is accepted too;
- heads 0-12 have 4 classes (0 blank, 1 positive, 2 negative, 3 uncertain), head 13 (No
  Finding) has 2 (0 blank, 1 positive);
- the heads follow CheXbert's condition order (`HEAD_ORDER`), not the CheXpert column order;
- reports are whitespace-normalised, WordPiece-tokenised with [CLS]/[SEP] and cut at 512
  tokens (the last kept one being [SEP]); an empty report is [CLS] [SEP].

The checkpoint is loaded with `weights_only=True` (no pickled code runs). The tokenizer is a
local `bert-base-uncased` folder (`vocab.txt`): the one given, else the checkpoint's own folder
when it holds a `vocab.txt`, else the Hugging Face cache (`local_files_only=True`). Nothing is
downloaded; a missing piece is an error that names it. The BERT shape comes from a
`config.json` beside the tokenizer or weights when there is one, else from the tensors
(bert-base-uncased: 12 layers, 768 wide, 12 heads).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raydiology.evaluation.labeler import OBSERVATIONS, Label

NAME = "chexbert"
HEAD_ORDER = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
# Class index -> CheXpert label, for the 4-class heads and for the No Finding head.
CLASSES: tuple[Label, ...] = (None, 1, 0, -1)
NO_FINDING_CLASSES: tuple[Label, ...] = (None, 1)
MAX_TOKENS = 512
_SPACE = re.compile(r"\s+")


def _load_state_dict(weights: Path) -> dict[str, Any]:
    import torch

    if not weights.is_file():
        raise FileNotFoundError(f"CheXbert weights: {weights} does not exist")
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
        raise ValueError(f"CheXbert weights: {weights} is not a loadable checkpoint: {e}") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"CheXbert weights: {weights} holds no state dict")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _config(state: dict[str, Any], folders: list[Path]) -> Any:
    """BertConfig: a config.json in one of `folders`, else read off the tensor shapes."""
    from transformers import BertConfig

    for folder in folders:
        if (folder / "config.json").is_file():
            return BertConfig.from_json_file(str(folder / "config.json"))
    try:
        vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
        positions = state["bert.embeddings.position_embeddings.weight"].shape[0]
        types = state["bert.embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"CheXbert weights: no {e.args[0]!r}: not a CheXbert checkpoint") from e
    layers = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))
    )
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),  # BERT's heads are 64 wide
        intermediate_size=intermediate,
        max_position_embeddings=positions,
        type_vocab_size=types,
    )


def _tokenizer_folder(weights: Path, tokenizer: str | os.PathLike | None) -> Path | None:
    """The local tokenizer folder to use, or None for the Hugging Face cache."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not (folder / "vocab.txt").is_file():
            raise FileNotFoundError(
                f"CheXbert tokenizer: {folder} has no vocab.txt (give a local "
                "bert-base-uncased folder with --tokenizer)"
            )
        return folder
    if (weights.parent / "vocab.txt").is_file():
        return weights.parent
    return None


def _load_tokenizer(folder: Path | None) -> Any:
    from transformers import BertTokenizer

    if folder is not None:
        return BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    try:
        return BertTokenizer.from_pretrained("bert-base-uncased", local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            "CheXbert tokenizer: no vocab.txt beside the weights and no bert-base-uncased in "
            "the Hugging Face cache; give a local bert-base-uncased folder with --tokenizer "
            "(nothing is downloaded at run time)"
        ) from e


class CheXbertLabeler:
    """A CheXbert checkpoint as a labeler: `label_many(reports)` -> CheXpert-layout dicts."""

    name = NAME

    def __init__(
        self,
        weights: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        import torch
        from transformers import BertModel

        weights = Path(weights)
        state = _load_state_dict(weights)
        folder = _tokenizer_folder(weights, tokenizer)
        self.tokenizer = _load_tokenizer(folder)
        config = _config(state, [f for f in (folder, weights.parent) if f is not None])

        self.bert = BertModel(config)
        hidden = config.hidden_size
        self.heads = torch.nn.ModuleList(
            [torch.nn.Linear(hidden, 4) for _ in range(13)] + [torch.nn.Linear(hidden, 2)]
        )
        model = torch.nn.ModuleDict({"bert": self.bert, "linear_heads": self.heads})
        expected = set(model.state_dict())
        # Checkpoints from older transformers carry a position_ids buffer newer ones do not.
        state = {k: v for k, v in state.items() if k in expected or "position_ids" not in k}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"CheXbert weights: {weights} does not match the CheXbert layout "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        model.load_state_dict(state)
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.weights = weights
        self.tokenizer_source = (
            "bert-base-uncased (Hugging Face cache)" if folder is None else str(folder.resolve())
        )

    def encode(self, report: str) -> list[int]:
        """Token ids as CheXbert's own tokenizer step makes them."""
        text = _SPACE.sub(" ", report.strip())
        tokens = self.tokenizer.tokenize(text) if text else []
        if not tokens:
            return [self.tokenizer.cls_token_id, self.tokenizer.sep_token_id]
        ids: list[int] = [
            self.tokenizer.cls_token_id,
            *self.tokenizer.convert_tokens_to_ids(tokens),
            self.tokenizer.sep_token_id,
        ]
        if len(ids) > MAX_TOKENS:
            ids = [*ids[: MAX_TOKENS - 1], self.tokenizer.sep_token_id]
        return ids

    def label_many(self, reports: Iterable[str]) -> list[dict[str, Label]]:
        import torch

        encoded = [self.encode(r) for r in reports]
        out: list[dict[str, Label]] = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                batch = encoded[start : start + self.batch_size]
                width = max(map(len, batch))
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                hidden = self.bert(ids.to(self.device), attention_mask=mask.to(self.device))[0]
                cls = hidden[:, 0, :]
                classes = [head(cls).argmax(dim=1).tolist() for head in self.heads]
                for row in range(len(batch)):
                    labels = {
                        name: (NO_FINDING_CLASSES if name == "No Finding" else CLASSES)[
                            classes[i][row]
                        ]
                        for i, name in enumerate(HEAD_ORDER)
                    }
                    out.append({o: labels[o] for o in OBSERVATIONS})
        return out

    def label(self, report: str) -> dict[str, Label]:
        return self.label_many([report])[0]

    def provenance(self) -> dict[str, str]:
        """What made the labels, for the sidecar beside a labels CSV."""
        return {
            "labeler": self.name,
            "weights": str(self.weights.resolve()),
            "tokenizer": self.tokenizer_source,
        }


def make_labeler(
    kind: str,
    *,
    weights: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    device: str = "cpu",
) -> Any:
    """The labeler named `kind`: "rules" (built in) or "chexbert" (needs `weights`)."""
    from raydiology.evaluation.labeler import default_labeler

    if kind == "rules":
        if weights is not None or tokenizer is not None:
            raise ValueError("--weights/--tokenizer are for --labeler chexbert")
        return default_labeler()
    if kind == NAME:
        if weights is None:
            raise ValueError("--labeler chexbert needs --weights PATH (a CheXbert checkpoint)")
        return CheXbertLabeler(weights, tokenizer=tokenizer, device=device)
    raise ValueError(f"unknown labeler {kind!r}: expected 'rules' or 'chexbert'")
