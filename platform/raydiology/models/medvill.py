"""MedViLL (Moon et al., 2022): one BERT over visual features and report tokens, whose
attention mask decides what it is good at (understanding vs generation).

    image [B, C, 512, 512] -> ResNet-50 trunk (timm) -> 16x16x2048 -> 256 positions
        (pretraining: a random 180 kept, in grid order) -> Linear(2048 -> 768)
        + BERT position embedding of the grid position + token type 0
    sequence  [CLS] v_1 .. v_n [SEP] w_1 .. w_m [SEP] pad     (text: token type 1)

Position ids as the official pretraining model assigns them (models/MedViLL_origin.py
`MedViLLEncoder.forward`, models/image.py `ImageEncoder_cnn.forward`): the visual token at grid
index g -> g; [CLS] and the image [SEP] are embedded on their own by BERT's embeddings -> 0
each; the text is embedded as its own sequence -> 0, 1, 2, ... (with `noncross`, its [CLS] is
embedded alone too -> 0, and the words again from 0). The token type tells the segments apart.
With G = 256 and 253 text tokens the sequence is the official 512 tokens
(configs/pretrain.yaml `seq_len: 253`, `max_seq_len: 512`).

Attention masks (`attention_mask`), True = the row's token may attend to the column's:
  bi        every non-pad token attends to every non-pad token;
  s2s       image block ([CLS] V [SEP]) attends to the image block only; text attends to the
            image block and causally to text (itself and earlier);
  bar       as s2s, but image rows attend to every non-pad column (the paper's proposal);
  noncross  image block <-> image block and text <-> text only (the text block then starts
            with its own [CLS]; the pooled output is the product of the two [CLS] states);
  mixed     per sample bi (probability `bi_prob`, 0.25) or s2s, in training; in eval mode
            bi, so evaluations are deterministic (the official understanding tasks run with
            full attention at test time: downstream_task/retrieval/retrieval.py
            `data_processing` feeds a padding-only mask).
Pad rows attend to every non-pad column in every scheme: their outputs are never used, and a
row with nothing to attend to would give NaN.

The whole model (CNN, joint BERT, pretraining heads, tokenizer) is exported beside the
encoder (`medvill.safetensors` + `medvill.json` + `tokenizer/`, written by the objectives'
`export_extra`) and read back with `load_medvill(run_or_export_dir)`; `model.pretrained`
starts a run (downstream fine-tuning, or more pretraining) from such an export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from raydiology.config_base import ConfigError, check
from raydiology.data.tokenizers import TokenizerConfig
from raydiology.registry import MODELS

MaskScheme = Literal["bi", "s2s", "bar", "noncross", "mixed"]
MASK_SCHEMES: tuple[str, ...] = ("bi", "s2s", "bar", "noncross", "mixed")
IMAGE, TEXT, PAD = 0, 1, -1  # segment ids
# A ResNet trunk's stages in order: the stem (every child before layer1), then layer1-4.
TRUNK_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# The full-model export, beside encoder.safetensors/encoder.json in a run's export/ folder.
MEDVILL_FORMAT = "raydiology-medvill/1"
MEDVILL_WEIGHTS = "medvill.safetensors"  # the objective's state dict: model.*, head.*
MEDVILL_SPEC = "medvill.json"
MEDVILL_TOKENIZER = "tokenizer"
TOKENIZER_META = "medvill_tokenizer.json"


# ----------------------------------------------------------------------------- masks


def _valid_columns(segments: Tensor) -> Tensor:
    """segments [B, L] -> [B, L, L]: every row may see every non-pad column."""
    b, length = segments.shape
    return (segments != PAD)[:, None, :].expand(b, length, length)


def _with_pad_rows(mask: Tensor, segments: Tensor) -> Tensor:
    pad_rows = (segments == PAD)[:, :, None]
    return torch.where(pad_rows, _valid_columns(segments), mask)


def bi_mask(segments: Tensor) -> Tensor:
    """segments [B, L] (0 image block, 1 text, -1 pad) -> bool [B, L, L]."""
    return _valid_columns(segments).clone()


def s2s_mask(segments: Tensor) -> Tensor:
    length = segments.shape[1]
    img_col = (segments == IMAGE)[:, None, :]
    txt_col = (segments == TEXT)[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    text_rows = img_col | (txt_col & causal)
    mask = torch.where((segments == TEXT)[:, :, None], text_rows, img_col.expand_as(text_rows))
    return _with_pad_rows(mask, segments)


def bar_mask(segments: Tensor) -> Tensor:
    mask = s2s_mask(segments)
    return torch.where((segments == IMAGE)[:, :, None], _valid_columns(segments), mask)


def noncross_mask(segments: Tensor) -> Tensor:
    same = segments[:, :, None] == segments[:, None, :]
    return _with_pad_rows(same & (segments != PAD)[:, None, :], segments)


def mixed_mask(
    segments: Tensor, *, bi_prob: float = 0.25, generator: torch.Generator | None = None
) -> Tensor:
    """Per sample: bi with probability `bi_prob`, else s2s."""
    device = generator.device if generator is not None else None
    draw = torch.rand(segments.shape[0], generator=generator, device=device)
    use_bi = (draw < bi_prob).to(segments.device)[:, None, None]
    return torch.where(use_bi, bi_mask(segments), s2s_mask(segments))


def attention_mask(
    scheme: str,
    segments: Tensor,
    *,
    bi_prob: float = 0.25,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The scheme's bool [B, L, L] mask (True = may attend) for segments [B, L]."""
    if scheme == "mixed":
        return mixed_mask(segments, bi_prob=bi_prob, generator=generator)
    makers = {"bi": bi_mask, "s2s": s2s_mask, "bar": bar_mask, "noncross": noncross_mask}
    if scheme not in makers:
        raise ValueError(f"unknown attention mask {scheme!r}; one of {MASK_SCHEMES}")
    return makers[scheme](segments)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class MedViLLArgs:
    trunk: str  # timm CNN name
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int | None  # None = the tokenizer's size


MEDVILL_FLAVORS: dict[str, MedViLLArgs] = {
    # CPU tests: resnet10t trunk (512 channels), a 2-layer 64-wide BERT.
    "tiny": MedViLLArgs(trunk="resnet10t", hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128, vocab_size=None),
    # The paper: ResNet-50 (2048 channels) and bert-base-uncased (vocab 30,522).
    "paper": MedViLLArgs(trunk="resnet50", hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, vocab_size=30522),
}  # fmt: skip


# Without a tokenizer section or a bert_path folder: WordPiece trained on the phantom reports.
DEFAULT_TOKENIZER = TokenizerConfig(
    kind="wordpiece", train_reports="phantom", vocab_size=8000, min_freq=1, clean=None
)


@dataclass(kw_only=True)
class MedViLLConfig:
    """The `model` section for ``name: medvill``.

    `pretrained` lives here, not on a downstream objective: what it replaces is the model
    (weights and tokenizer, whose ids the weights assume), and the model section is what
    builds the model on every worker, before any objective exists. So every objective
    (diagnosis, VQA, more pretraining) starts from an export the same way, and the paper's
    "fine-tuning only" baseline is one key (`pretrained: null`, the profile
    `medvill_finetune_only`). The architecture keys must describe the exported model.
    """

    flavor: str = "tiny"
    trunk: str | None = None  # override the flavor's timm CNN
    trunk_checkpoint: str | None = None  # local weights (e.g. ImageNet ResNet-50); null = random
    # Leading ResNet stages kept frozen (no gradient, left out of the optimizer): 1 = the stem,
    # 2 = stem + layer1, ... 5 = the whole trunk. 2 is the official intent: MedViLL_origin.py
    # `MedViLLEncoder.__init__` freezes the CNN and re-enables `children()[5:]` ("we train some
    # part of the layer"), as cnn_bert.py `IMG_Encoder` does ("only fine-tune convolutional
    # blocks 2 through 4"). (In MedViLL_origin.py that loop walks the wrapper module, whose
    # only child is the Sequential, so its released code freezes all five: 5 reproduces it.)
    # BatchNorm statistics still update in training, as there. 0 = train the whole trunk.
    freeze_trunk_stages: int = 2
    vocab_size: int | None = None
    bert_path: str | None = None  # a local save_pretrained BERT folder (weights + tokenizer)
    # null = the folder's tokenizer (bert_path), else WordPiece trained on the phantom reports
    tokenizer: TokenizerConfig | None = None
    max_text_tokens: int = 253  # 1 + 256 + 1 + 253 + 1 = 512 tokens (pretrain.yaml seq_len)
    visual_keep: float = 180 / 256  # share of grid positions kept in pretraining (180 of 256)
    attention: MaskScheme = "bar"
    bi_prob: float = 0.25  # `mixed`: bi for this share of samples, s2s for the rest
    dropout: float = 0.1
    # A MedViLL run folder or its export/ (medvill.safetensors + tokenizer/): its weights and
    # tokenizer replace the random init. An absolute path: workers may run elsewhere.
    # null = random init (the paper's "fine-tuning only" baseline).
    pretrained: str | None = None

    def tokenizer_slot(self) -> tuple[Any, TokenizerConfig] | None:
        """(the config whose `tokenizer` is set, the tokenizer it builds), None when the
        tokenizer comes from a folder (the BERT folder's, or the pretrained export's): see
        train.launch.pin_tokenizer."""
        if self.pretrained is not None or (self.tokenizer is None and self.bert_path is not None):
            return None
        return self, self.tokenizer or DEFAULT_TOKENIZER

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(self.flavor in MEDVILL_FLAVORS, f"{k}flavor", self.flavor,
              "one of " + ", ".join(MEDVILL_FLAVORS))  # fmt: skip
        check(self.attention in MASK_SCHEMES, f"{k}attention", self.attention,
              "one of " + ", ".join(MASK_SCHEMES))  # fmt: skip
        check(0 < self.visual_keep <= 1, f"{k}visual_keep", self.visual_keep, "0 < share <= 1")
        check(0 <= self.bi_prob <= 1, f"{k}bi_prob", self.bi_prob, "a probability")
        check(self.max_text_tokens >= 1, f"{k}max_text_tokens", self.max_text_tokens, ">= 1")
        check(0 <= self.freeze_trunk_stages <= len(TRUNK_STAGES), f"{k}freeze_trunk_stages",
              self.freeze_trunk_stages, f"0 to {len(TRUNK_STAGES)}")  # fmt: skip
        if self.tokenizer is not None:
            self.tokenizer.validate(f"{k}tokenizer")

    def args(self) -> MedViLLArgs:
        base = MEDVILL_FLAVORS[self.flavor]
        return MedViLLArgs(
            trunk=self.trunk or base.trunk,
            hidden_size=base.hidden_size,
            num_layers=base.num_layers,
            num_heads=base.num_heads,
            intermediate_size=base.intermediate_size,
            vocab_size=self.vocab_size or base.vocab_size,
        )


# ----------------------------------------------------------------------------- tokenizer


class JointTokenizer:
    """Report text -> ids, with [CLS]/[SEP]/[PAD]/[MASK] ids for the joint sequence."""

    def __init__(self, hf: Any, *, cls_id: int, sep_id: int, pad_id: int, mask_id: int,
                 clean: str | None) -> None:  # fmt: skip
        self.hf, self.cls_id, self.sep_id, self.pad_id, self.mask_id = (
            hf, cls_id, sep_id, pad_id, mask_id,
        )  # fmt: skip
        self.clean = clean  # R2Gen cleaning style applied before tokenizing, or None

    def _prepare(self, text: str) -> str:
        from raydiology.data.reports import clean_report

        return clean_report(text, style=self.clean) if self.clean else text  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def special_ids(self) -> set[int]:
        return {self.cls_id, self.sep_id, self.pad_id, self.mask_id}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(self._prepare(text), add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=True)).strip()

    def save(self, folder: Path) -> Path:
        """The Hugging Face files plus our special ids and cleaning, as JSON."""
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        meta = {"cls_id": self.cls_id, "sep_id": self.sep_id, "pad_id": self.pad_id,
                "mask_id": self.mask_id, "clean": self.clean}  # fmt: skip
        (folder / TOKENIZER_META).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Path) -> JointTokenizer:
        from transformers import AutoTokenizer

        meta = json.loads((folder / TOKENIZER_META).read_text())
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(hf, **meta)


def build_joint_tokenizer(cfg: MedViLLConfig) -> JointTokenizer:
    from pathlib import Path

    if cfg.tokenizer is None and cfg.bert_path is not None:
        from transformers import AutoTokenizer

        if not Path(cfg.bert_path).is_dir():
            raise ConfigError("model.bert_path", cfg.bert_path, "a local save_pretrained folder")
        hf = AutoTokenizer.from_pretrained(cfg.bert_path, local_files_only=True)
        ids = (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id)
        if any(i is None for i in ids):
            raise ConfigError(
                "model.bert_path", cfg.bert_path, "a BERT tokenizer (CLS/SEP/PAD/MASK)"
            )
        return JointTokenizer(hf, cls_id=ids[0], sep_id=ids[1], pad_id=ids[2], mask_id=ids[3],
                              clean=None)  # fmt: skip
    from raydiology.data.tokenizers import build_tokenizer

    rt = build_tokenizer(cfg.tokenizer or DEFAULT_TOKENIZER)
    hf = rt.hf
    hf.add_special_tokens({"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    return JointTokenizer(hf, cls_id=hf.cls_token_id, sep_id=hf.sep_token_id, pad_id=rt.pad_id,
                          mask_id=hf.mask_token_id, clean=rt.config.clean)  # fmt: skip


# ----------------------------------------------------------------------------- the module


class CNNGrid(nn.Module):
    """A timm CNN as an encoder: images -> grid tokens [B, h*w, C] (raster order)."""

    body: Any

    def __init__(self, name: str, *, in_chans: int, checkpoint: str | None) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
        if checkpoint is not None and torch.empty(0).device.type != "meta":
            from raydiology.train.safe_load import weights_only_load

            state = weights_only_load(checkpoint)
            self.body.load_state_dict(state.get("model", state), strict=False)
        self.embed_dim = int(self.body.num_features)
        self.in_chans, self.patch_size, self.num_prefix_tokens = in_chans, 32, 0

    def freeze_stages(self, stages: int) -> list[str]:
        """Turn off gradients of the first `stages` of TRUNK_STAGES; -> the frozen children."""
        if stages == 0:
            return []
        names = [name for name, _ in self.body.named_children()]
        if "layer1" not in names:
            raise ConfigError("model.freeze_trunk_stages", stages,
                              "0 for a trunk without ResNet stages (layer1..layer4)")  # fmt: skip
        frozen = names[: names.index("layer1")] + list(TRUNK_STAGES[1:stages])
        for name in frozen:
            for p in getattr(self.body, name).parameters():
                p.requires_grad_(False)
        return frozen

    def forward(self, images: Tensor) -> Tensor:
        return self.body.forward_features(images).flatten(2).transpose(1, 2)


class MedViLL(nn.Module):
    """The joint encoder plus its pretraining heads (MLM, image-report matching)."""

    bert: Any
    spec: dict[str, Any]  # set by load_medvill: the encoder export's JSON

    def __init__(self, encoder: CNNGrid, bert: Any, tokenizer: JointTokenizer, *,
                 grid: int, cfg: MedViLLConfig) -> None:  # fmt: skip
        super().__init__()
        hidden = int(bert.config.hidden_size)
        self.encoder = encoder
        self.visual_proj = nn.Linear(encoder.embed_dim, hidden)
        self.bert = bert
        self.mlm_transform = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12)
        )
        self.mlm_bias = nn.Parameter(torch.zeros(bert.config.vocab_size))
        self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.itm_head = nn.Linear(hidden, 2)
        self.tokenizer = tokenizer
        self.grid, self.cfg = grid, cfg

    # -- sequence -----------------------------------------------------------------------

    def visual_tokens(
        self, images: Tensor, *, keep: float = 1.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """images -> (features [B, n, 2048], grid positions [B, n]); n = round(keep x G),
        a random subset per image in grid order."""
        feats = self.encoder(images)  # [B, G, C]
        b, g = feats.shape[:2]
        n = max(1, round(keep * g))
        if n == g:
            pos = torch.arange(g, device=feats.device).expand(b, g)
        else:
            device = generator.device if generator is not None else None
            noise = torch.rand(b, g, generator=generator, device=device).to(feats.device)
            pos = noise.argsort(dim=1)[:, :n].sort(dim=1).values
        return feats.gather(1, pos[..., None].expand(-1, -1, feats.shape[-1])), pos

    def assemble(
        self, feats: Tensor, grid_pos: Tensor, texts: list[list[int]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> input embeddings [B, L, H], segments [B, L], token ids [B, L] (-1 on visuals).

        Text rows are ``w_1 .. w_m [SEP]`` (with a leading text [CLS] for `noncross`).
        """
        tok, device = self.tokenizer, feats.device
        b, n = grid_pos.shape
        lead = [tok.cls_id] if self.cfg.attention == "noncross" else []
        rows = [[*lead, *t[: self.cfg.max_text_tokens], tok.sep_id] for t in texts]
        width = max(len(r) for r in rows)
        length = n + 2 + width
        ids = torch.full((b, length), tok.pad_id, dtype=torch.long, device=device)
        ids[:, 0], ids[:, n + 1] = tok.cls_id, tok.sep_id
        ids[:, 1 : n + 1] = -1
        segments = torch.full((b, length), PAD, dtype=torch.long, device=device)
        segments[:, : n + 2] = IMAGE
        # [CLS], image [SEP] and pads 0; visuals their grid index; text from 0 (module doc)
        positions = torch.zeros((b, length), dtype=torch.long, device=device)
        positions[:, 1 : n + 1] = grid_pos
        words = torch.arange(width - len(lead), device=device)
        for i, row in enumerate(rows):
            ids[i, n + 2 : n + 2 + len(row)] = torch.tensor(row, device=device)
            segments[i, n + 2 : n + 2 + len(row)] = TEXT
            start = n + 2 + len(lead)  # a text [CLS] keeps 0, as it is embedded alone
            positions[i, start : n + 2 + len(row)] = words[: len(row) - len(lead)]
        emb = self.bert.embeddings
        tokens = emb.word_embeddings(ids.clamp(min=0))
        tokens[:, 1 : n + 1] = self.visual_proj(feats).to(tokens.dtype)
        types = (segments == TEXT).long()
        x = tokens + emb.position_embeddings(positions) + emb.token_type_embeddings(types)
        return emb.dropout(emb.LayerNorm(x)), segments, ids

    def encode(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """embeds [B, L, H], bool mask [B, L, L] -> hidden states [B, L, H]."""
        additive = torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device)
        additive = additive.masked_fill(~mask, torch.finfo(embeds.dtype).min)[:, None]
        return self.bert.encoder(embeds, attention_mask=additive).last_hidden_state

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """[..., H] -> [..., vocab], the decoder tied to the word embeddings."""
        h = self.mlm_transform(hidden)
        return h @ self.bert.embeddings.word_embeddings.weight.t() + self.mlm_bias

    def pooled(self, hidden: Tensor, segments: Tensor) -> Tensor:
        """The pooled [CLS] [B, H]: BERT's pooler on [CLS]; with `noncross`, where neither
        [CLS] sees the other modality, the element-wise product of the image and text [CLS]
        states, unpooled (models/MedViLL_origin.py `MedViLLEncoder.forward`, the
        disturbing_mask branch: ``encoded_layers[-1][:, 0] * encoded_layers[-1][:, N + 2]``)."""
        if self.cfg.attention == "noncross":
            first_text = (segments == TEXT).long().argmax(dim=1)
            text_cls = hidden[torch.arange(len(hidden), device=hidden.device), first_text]
            return hidden[:, 0] * text_cls
        return self.pooler(hidden[:, 0])

    def forward(self, images: Tensor, texts: list[list[int]], *, keep: float = 1.0,
                scheme: str | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """-> hidden [B, L, H], segments [B, L], token ids [B, L]."""
        feats, pos = self.visual_tokens(images, keep=keep, generator=generator)
        return self.joint(feats, pos, texts, scheme=scheme, generator=generator)

    def mask_scheme(self, scheme: str | None = None) -> str:
        """The mask `joint` applies for `scheme` (None = the model's): `mixed` in eval mode is
        bi, a fixed choice instead of a random mask per pair (see the module doc)."""
        scheme = scheme or self.cfg.attention
        return "bi" if scheme == "mixed" and not self.training else scheme

    def joint(self, feats: Tensor, grid_pos: Tensor, texts: list[list[int]], *,
              scheme: str | None = None,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Visual features [B, n, C] at grid positions [B, n] + token ids -> as `forward`."""
        embeds, segments, ids = self.assemble(feats, grid_pos, texts)
        mask = attention_mask(self.mask_scheme(scheme), segments, bi_prob=self.cfg.bi_prob,
                              generator=generator)  # fmt: skip
        return self.encode(embeds, mask), segments, ids


def build_bert(cfg: MedViLLConfig, tokenizer: JointTokenizer, *, weights: bool = True) -> Any:
    """The joint BERT; `weights=False` reads only the config of `bert_path` (its weights are
    about to be replaced by an export's, or the build is on the meta device)."""
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    if cfg.bert_path is not None:
        if not weights or torch.empty(0).device.type == "meta":
            return AutoModel.from_config(
                AutoConfig.from_pretrained(cfg.bert_path, local_files_only=True),
                add_pooling_layer=False,
            )
        return AutoModel.from_pretrained(
            cfg.bert_path, local_files_only=True, add_pooling_layer=False
        )
    a = cfg.args()
    vocab = a.vocab_size if a.vocab_size is not None else tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", vocab, f"at least {tokenizer.vocab_size}")
    return BertModel(
        BertConfig(vocab_size=vocab, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                   num_attention_heads=a.num_heads, intermediate_size=a.intermediate_size,
                   max_position_embeddings=512, type_vocab_size=2, pad_token_id=tokenizer.pad_id,
                   hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout),
        add_pooling_layer=False,
    )  # fmt: skip


@MODELS.register("medvill", MedViLLConfig)
def build_medvill(cfg: MedViLLConfig, *, image_size: int, in_chans: int) -> MedViLL:
    cfg.validate("model")
    if image_size % 32:
        raise ConfigError("data.resolution", image_size, "a multiple of 32 (the CNN stride)")
    grid = (image_size // 32) ** 2
    if grid + cfg.max_text_tokens + 3 > 512:  # [CLS] V [SEP] W [SEP]
        raise ConfigError("data.resolution", image_size,
                          f"at most 512 tokens: {grid} visual + {cfg.max_text_tokens} text + 3")  # fmt: skip
    if cfg.pretrained is not None and torch.empty(0).device.type != "meta":
        folder = find_medvill_export(cfg.pretrained)
        tokenizer = JointTokenizer.load(folder / MEDVILL_TOKENIZER)
        model = _medvill(cfg, grid=grid, in_chans=in_chans, tokenizer=tokenizer, weights=False)
        _load_model_weights(model, folder, key="model.pretrained")
        return model
    return _medvill(cfg, grid=grid, in_chans=in_chans, tokenizer=build_joint_tokenizer(cfg))


def _medvill(cfg: MedViLLConfig, *, grid: int, in_chans: int, tokenizer: JointTokenizer,
             weights: bool = True) -> MedViLL:  # fmt: skip
    """`weights=False`: no trunk checkpoint or BERT weights read (an export replaces them)."""
    checkpoint = cfg.trunk_checkpoint if weights else None
    encoder = CNNGrid(cfg.args().trunk, in_chans=in_chans, checkpoint=checkpoint)
    encoder.freeze_stages(cfg.freeze_trunk_stages)
    bert = build_bert(cfg, tokenizer, weights=weights)
    return MedViLL(encoder, bert, tokenizer, grid=grid, cfg=cfg)


# ----------------------------------------------------------------------------- export


def find_medvill_export(path: str | Path) -> Path:
    """A run folder or its export/ -> the folder holding medvill.json."""
    from raydiology.train.export import find_export_folder

    return find_export_folder(path, MEDVILL_SPEC, "MedViLL")


def _load_model_weights(model: MedViLL, folder: Path, *, key: str) -> None:
    """The `model.*` tensors of an export (any MedViLL objective's) into `model`, strictly."""
    from safetensors.torch import load_file

    state = load_file(str(folder / MEDVILL_WEIGHTS))
    mine = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(mine, strict=True)
    except RuntimeError as e:
        raise ConfigError(key, str(folder),
                          f"an export of this architecture (flavor, trunk, vocabulary, data.channels): {e}") from None  # fmt: skip


def load_medvill_export(path: str | Path) -> tuple[MedViLL, dict[str, Any], dict[str, Any]]:
    """(model on the CPU, encoder.json, medvill.json) of an export; the weights trained, not
    those `model.pretrained` of the exported run named."""
    from raydiology.config_base import from_dict
    from raydiology.train.export import SPEC

    folder = find_medvill_export(path)
    spec: dict[str, Any] = json.loads((folder / SPEC).read_text())
    extra: dict[str, Any] = json.loads((folder / MEDVILL_SPEC).read_text())
    if extra.get("format") != MEDVILL_FORMAT:
        raise ValueError(f"{folder / MEDVILL_SPEC}: format {extra.get('format')!r} "
                         f"is not {MEDVILL_FORMAT!r}")  # fmt: skip
    section = {k: v for k, v in spec["model"].items() if k != "name"}
    cfg = from_dict(MedViLLConfig, {**section, "pretrained": None}, "model")
    grid = (int(spec["image_size"]) // 32) ** 2
    tokenizer = JointTokenizer.load(folder / extra["tokenizer"])
    model = _medvill(cfg, grid=grid, in_chans=int(spec["in_chans"]), tokenizer=tokenizer,
                     weights=False)  # fmt: skip
    _load_model_weights(model, folder, key="path")
    return model, spec, extra


def load_medvill(run_or_export_dir: str | Path, *, device: str | torch.device = "cpu") -> MedViLL:
    """The exported MedViLL (CNN, joint BERT, MLM/matching heads, tokenizer) in eval mode.

    Safetensors only, nothing unpickled. `.spec` carries the encoder export's JSON (image
    size, channels, mean/std: how to feed it).
    """
    model, spec, _ = load_medvill_export(run_or_export_dir)
    model.spec = spec
    return model.to(device).eval()


@torch.no_grad()
def matching_scores(model: MedViLL, images: Tensor, reports: list[str], *,
                    chunk: int = 64) -> Tensor:  # fmt: skip
    """images [N, C, R, R] x M reports -> P(match) [N, M] from the matching head, every pair
    through the joint encoder (all grid positions, the model's attention mask)."""
    texts = [model.tokenizer.encode(r)[: model.cfg.max_text_tokens] for r in reports]
    feats, pos = model.visual_tokens(images)
    rows = []
    for i in range(len(images)):
        scores = []
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            f = feats[i : i + 1].expand(len(part), -1, -1)
            p = pos[i : i + 1].expand(len(part), -1)
            hidden, segments, _ = model.joint(f, p, part)
            logits = model.itm_head(model.pooled(hidden, segments))
            scores.append(logits.softmax(dim=-1)[:, 1])
        rows.append(torch.cat(scores))
    return torch.stack(rows)
