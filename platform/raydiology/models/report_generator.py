"""Report generator: an image encoder's visual tokens fed into a causal LLM (R2GenGPT,
MambaXray-VL stage 3, XR-0's report head).

    images [B, C, R, R] -> vision encoder -> all tokens [B, T, d] -> Linear(d -> H) ->
    LayerNorm(H) -> visual embeddings [B, T, H] in the LLM's input space

(a multi-view study, images [B, V, C, R, R] + view_mask [B, V], averages its views' tokens
over the real views before the projector)

and one sequence per image, loss on the report only:

    [BOS] prompt-before <T visual embeddings> prompt-after report [EOS]

The vision encoder is an exported raydiology encoder (`vision.path`, read with
`raydiology.load_encoder`), a registry model built from its config (`vision.model`), or a timm
model (`vision.timm`). The LLM is a Hugging Face causal LM (Llama, GPT-2, Qwen2 families) built
from a flavor and overrides with random weights, or read from a local `save_pretrained` folder
(`llm.path`); nothing is downloaded. What trains is per part: `frozen` / `lora` (peft) /
`full` — R2GenGPT's shallow (both frozen), delta (LoRA) and deep (full) alignments.

Shapes: B batch, V views, T visual tokens, d encoder width, H LLM width, L prefix length
(BOS + prompt + visual tokens), S report tokens + EOS.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from raydiology.config_base import ConfigError, check, from_dict, with_overrides
from raydiology.data.reports import CleanStyle
from raydiology.data.tokenizers import ReportTokenizer, TokenizerConfig, build_tokenizer
from raydiology.registry import MODELS

PAPER_PROMPT = (
    "Human: <Img><ImageHere></Img> Generate a comprehensive and detailed diagnosis report "
    "for this chest xray image. \nAssistant:"
)
TrainMode = Literal["frozen", "lora", "full"]
Family = Literal["llama", "gpt2", "qwen2"]


@dataclass(frozen=True, kw_only=True)
class LLMArgs:
    """The numbers that size one decoder (one row of the flavors table)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None  # None = the tokenizer's vocabulary size
    max_positions: int


REPORT_GENERATOR_FLAVORS: dict[str, LLMArgs] = {
    # CPU tests: a 2-layer, 64-wide decoder over a small report vocabulary.
    "tiny": LLMArgs(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        intermediate_size=128, vocab_size=None, max_positions=512,
    ),
    # Llama-2-7B's shape (R2GenGPT, MambaXray-VL): weights come from `llm.path` in real runs.
    "llama2_7b": LLMArgs(
        hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=11008, vocab_size=32000, max_positions=4096,
    ),
}  # fmt: skip


@dataclass(kw_only=True)
class LoraSettings:
    """peft LoRA on the named Linear layers (null = the family's usual attention projections)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    def validate(self, key: str) -> None:
        check(self.r >= 1, f"{key}.r", self.r, "at least 1")
        check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "0 <= dropout < 1")


@dataclass(kw_only=True)
class LLMConfig:
    """The decoder: a family sized by the flavor (+ overrides), or a local folder."""

    family: Family = "llama"
    path: str | None = None  # a local save_pretrained folder: its config and weights win
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_positions: int | None = None
    train: TrainMode = "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False  # recompute activations (7B under ZeRO-3)

    def validate(self, key: str) -> None:
        self.lora.validate(f"{key}.lora")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "vocab_size", "max_positions"):  # fmt: skip
            value = getattr(self, name)
            check(value is None or value > 0, f"{key}.{name}", value, "a positive number or null")


@dataclass(kw_only=True)
class VisionConfig:
    """The image encoder: an export (`path`), a timm model (`timm`), or a registry model."""

    path: str | None = None  # a raydiology export folder (raydiology.load_encoder)
    timm: str | None = None  # a timm model name, e.g. swin_base_patch4_window7_224
    timm_checkpoint: str | None = None  # local weights for the timm model; null = random
    # a registry model section (name + its config), built from config with random weights
    model: dict[str, Any] = field(default_factory=lambda: {"name": "hd_mae", "flavor": "tiny"})
    drop_prefix_tokens: bool = False  # drop CLS-like tokens; default keeps all tokens
    train: TrainMode = "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self, key: str) -> None:
        self.lora.validate(f"{key}.lora")
        check(
            self.path is None or self.timm is None,
            f"{key}.timm",
            self.timm,
            "null when vision.path names an export (one source of the encoder)",
        )
        if self.path is None and self.timm is None:
            name = self.model.get("name") if isinstance(self.model, dict) else None
            check(
                isinstance(name, str) and name not in ("report_generator", "r2gen"),
                f"{key}.model.name",
                name,
                "a registered image model (e.g. hd_mae)",
            )
            entry = _model_entry(name, f"{key}.model.name")
            from_dict(entry.config_cls, {k: v for k, v in self.model.items() if k != "name"},
                      f"{key}.model")  # fmt: skip


@dataclass(kw_only=True)
class ReportGeneratorConfig:
    """The `model` section for ``name: report_generator``."""

    flavor: str = "tiny"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    # null = the LLM's own tokenizer (llm.path), or without one a word-level tokenizer
    # trained on the built-in phantom reports
    tokenizer: TokenizerConfig | None = None
    # How reports are cleaned for the tokenizer `tokenizer: null` stands for (a named one
    # carries its own `clean`): R2Gen's IU style, or `mimic` / `r2gengpt-mimic` for MIMIC-CXR
    # and CheXpert Plus text, whose newlines IU cleaning would keep (data/reports.py).
    clean: CleanStyle | None = "iu"
    prompt: str = PAPER_PROMPT
    image_placeholder: str = "<ImageHere>"

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            self.flavor in REPORT_GENERATOR_FLAVORS,
            f"{k}flavor",
            self.flavor,
            "one of the flavors " + ", ".join(REPORT_GENERATOR_FLAVORS),
        )
        check(
            self.prompt.count(self.image_placeholder) == 1,
            f"{k}prompt",
            self.prompt,
            f"a prompt holding the image placeholder {self.image_placeholder!r} exactly once",
        )
        self.llm.validate(f"{k}llm")
        self.vision.validate(f"{k}vision")
        r = self.llm_args()
        check(
            r.hidden_size % r.num_heads == 0 and r.num_heads % r.num_kv_heads == 0,
            f"{k}llm.num_heads",
            r.num_heads,
            f"a divisor of hidden_size ({r.hidden_size}) and a multiple of num_kv_heads",
        )

    def llm_args(self) -> LLMArgs:
        """The flavor's row with the `llm` overrides applied."""
        return LLMArgs(**with_overrides(REPORT_GENERATOR_FLAVORS[self.flavor], self.llm))

    def tokenizer_config(self) -> TokenizerConfig:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.llm.path is not None:
            return TokenizerConfig(kind="pretrained", path=self.llm.path, clean=self.clean)
        return TokenizerConfig(kind="word", train_reports="phantom", min_freq=1, clean=self.clean)

    def tokenizer_slot(self) -> tuple[Any, TokenizerConfig]:
        """(the config whose `tokenizer` is set, the tokenizer it builds): see pin_tokenizer."""
        return self, self.tokenizer_config()


def _model_entry(name: Any, key: str):
    try:
        return MODELS.get(name)
    except KeyError:
        raise ConfigError(key, name, f"one of the registered models {MODELS.names()}") from None


# ----------------------------------------------------------------------------- views


def encode_views(
    encoder: nn.Module,
    images: Tensor,
    view_mask: Tensor | None = None,
    *,
    drop_prefix: int = 0,
    combine: Literal["mean", "concat"] = "mean",
) -> tuple[Tensor, Tensor | None]:
    """An encoder's tokens for single images or multi-view studies.

    images [B, C, R, R] -> tokens [B, T, d], None. A study, images [B, V, C, R, R] with
    `view_mask` [B, V] (True = a real view; None = all real), combines its views' tokens:
    - mean: [B, T, d], averaged over the real views (report_generator), None;
    - concat: [B, V*T, d], the views one after the other (R2Gen), and a token mask
      [B, V*T] that is False on a padded view's tokens (None without a view mask).
    Padded views never reach the encoder, so they cost nothing and cannot touch batch
    statistics; their concatenated tokens are zeros, for the mask to hide.
    """
    if images.ndim == 4:
        return encoder(images)[:, drop_prefix:], None
    b, v = images.shape[:2]
    flat = images.flatten(0, 1)  # [B*V, C, R, R]
    if view_mask is None:
        tokens = encoder(flat)[:, drop_prefix:].unflatten(0, (b, v))  # [B, V, T, d]
        return (tokens.mean(dim=1) if combine == "mean" else tokens.flatten(1, 2)), None
    real = view_mask.reshape(-1).bool()
    tokens = encoder(flat[real])[:, drop_prefix:]  # [real views, T, d]
    if combine == "concat":
        where = real.nonzero().squeeze(1)
        every = tokens.new_zeros(b * v, *tokens.shape[1:]).index_copy(0, where, tokens)
        mask = view_mask.bool().repeat_interleave(tokens.shape[1], dim=1)  # [B, V*T]
        return every.unflatten(0, (b, v)).flatten(1, 2), mask
    study = torch.arange(b, device=images.device).repeat_interleave(v)[real]
    sums = tokens.new_zeros(b, *tokens.shape[1:]).index_add(0, study, tokens)
    counts = view_mask.sum(dim=1).clamp_min(1).to(tokens.dtype)  # [B]
    return sums / counts[:, None, None], None


# ----------------------------------------------------------------------------- the module


class ReportGenerator(nn.Module):
    """images [B, C, R, R] (or [B, V, C, R, R]) + report token ids -> loss; or -> reports."""

    llm: Any  # a transformers causal LM (typed loosely: its methods are not nn.Module's)

    def __init__(
        self,
        encoder: nn.Module,
        llm: Any,
        tokenizer: ReportTokenizer,
        *,
        prompt: str,
        image_placeholder: str,
        drop_prefix_tokens: bool,
        llm_from_path: bool = False,
        llm_train: TrainMode = "frozen",
    ) -> None:
        super().__init__()
        # what an export must save: a frozen LLM read from a folder is read again from there
        self.llm_from_path, self.llm_train = llm_from_path, llm_train
        self.encoder = encoder
        table = llm.get_input_embeddings().weight  # partitioned (empty) when built under ZeRO-3
        width = int(getattr(table, "ds_shape", table.shape)[1])
        self.proj = nn.Linear(int(encoder.embed_dim), width)  # type: ignore[arg-type]
        self.proj_norm = nn.LayerNorm(width)
        self.llm = llm
        self.tokenizer = tokenizer  # not a module: travels with the export, not the state_dict
        self.drop_prefix = (
            int(getattr(encoder, "num_prefix_tokens", 0)) if drop_prefix_tokens else 0
        )
        before, after = prompt.split(image_placeholder)
        self.prompt_before = [tokenizer.bos_id, *tokenizer.encode(before, clean=False)]
        self.prompt_after = tokenizer.encode(after, clean=False)

    # -- embeddings ---------------------------------------------------------------------

    def embed_images(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """images [B, C, R, R] or [B, V, C, R, R] -> visual embeddings [B, T, H].

        With several views per study the views' tokens are averaged (MambaXray-VL, R2GenGPT),
        over the views `view_mask` [B, V] marks real (see `encode_views`).
        """
        tokens, _ = encode_views(self.encoder, images, view_mask, drop_prefix=self.drop_prefix)
        return self.proj_norm(self.proj(tokens))

    def embed_ids(self, ids: Tensor) -> Tensor:
        """token ids [B, S] -> the LLM's input embeddings [B, S, H]."""
        return self.llm.get_input_embeddings()(ids)

    def prefix(self, visual: Tensor) -> Tensor:
        """visual [B, T, H] -> [BOS] prompt-before visual prompt-after: [B, L, H]."""
        b, device = visual.shape[0], visual.device
        before = torch.tensor(self.prompt_before, device=device).expand(b, -1)
        after = torch.tensor(self.prompt_after, device=device, dtype=torch.long).expand(b, -1)
        parts = [self.embed_ids(before), visual]
        if after.shape[1]:
            parts.append(self.embed_ids(after))
        return torch.cat([p.to(visual.dtype) for p in parts], dim=1)

    def assemble(self, visual: Tensor, reports: list[list[int]]) -> dict[str, Tensor]:
        """visual [B, T, H] + report ids -> the LLM's training inputs.

        Returns inputs_embeds [B, L+S, H], attention_mask [B, L+S] (0 on right padding) and
        labels [B, L+S]: the report ids and EOS, -100 on the prefix and the padding.
        """
        prefix = self.prefix(visual)  # [B, L, H]
        b, length = prefix.shape[:2]
        tok = self.tokenizer
        rows = [[*ids, tok.eos_id] for ids in reports]
        width = max(len(r) for r in rows)
        device = visual.device
        ids = torch.full((b, width), tok.pad_id, dtype=torch.long, device=device)
        labels = torch.full((b, length + width), -100, dtype=torch.long, device=device)
        mask = torch.zeros((b, length + width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, device=device)
            labels[i, length : length + len(row)] = ids[i, : len(row)]
            mask[i, : length + len(row)] = 1
        embeds = torch.cat([prefix, self.embed_ids(ids).to(prefix.dtype)], dim=1)
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}

    def forward(
        self, images: Tensor, reports: list[list[int]], view_mask: Tensor | None = None
    ) -> Tensor:
        """images + report token ids (without EOS) -> mean cross-entropy over report tokens."""
        inputs = self.assemble(self.embed_images(images, view_mask), reports)
        return self.llm(**inputs, use_cache=False).loss

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        *,
        num_beams: int = 3,
        max_new_tokens: int = 120,
        min_new_tokens: int = 80,
        repetition_penalty: float = 2.0,
        length_penalty: float = 2.0,
        no_repeat_ngram_size: int = 0,
        synced_gpus: bool = False,
        view_mask: Tensor | None = None,
    ) -> list[str]:
        """images [B, ...] -> B reports: beam search over the LLM with its KV cache.

        Every row's prefix has the same length, so the batch needs no padding. Under ZeRO-3
        every rank must call with `synced_gpus=True`: each forward gathers weights from all
        ranks, so a rank that has finished keeps stepping until every rank has.
        """
        prefix = self.prefix(self.embed_images(images, view_mask))
        tok = self.tokenizer
        with warnings.catch_warnings():
            # the penalty then applies to the report so far, not the prompt: what we want
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty`")
            out = self._generate(prefix, tok, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                                 length_penalty=length_penalty,
                                 no_repeat_ngram_size=no_repeat_ngram_size,
                                 synced_gpus=synced_gpus)  # fmt: skip
        # with inputs_embeds only, generate returns just the new tokens
        return [tok.decode(row.tolist()) for row in out]

    def _generate(self, prefix: Tensor, tok: ReportTokenizer, **settings: Any) -> Tensor:
        return self.llm.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            bos_token_id=tok.bos_id,
            use_cache=True,
            **settings,
        )


# ----------------------------------------------------------------------------- building


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def build_llm(cfg: ReportGeneratorConfig, tokenizer: ReportTokenizer) -> Any:
    """The Hugging Face causal LM: from `llm.path` (local only) or from the flavor's sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    llm = cfg.llm
    if llm.path is not None:
        if not Path(llm.path).is_dir():
            raise ConfigError("model.llm.path", llm.path, "a local save_pretrained folder")
        if _on_meta():  # validation and parameter counts: shapes only, no weights read
            return AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(llm.path, local_files_only=True)
            )
        return AutoModelForCausalLM.from_pretrained(
            llm.path, local_files_only=True, dtype=torch.float32
        )
    r = cfg.llm_args()
    vocab = r.vocab_size if r.vocab_size is not None else tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            "model.llm.vocab_size",
            vocab,
            f"at least the tokenizer's {tokenizer.vocab_size} tokens (or null to match it)",
        )
    ids: dict[str, Any] = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}  # fmt: skip
    config: Any
    if llm.family == "gpt2":
        from transformers import GPT2Config

        config = GPT2Config(
            n_embd=r.hidden_size, n_layer=r.num_layers, n_head=r.num_heads,
            n_inner=r.intermediate_size, vocab_size=vocab, n_positions=r.max_positions, **ids,
        )  # fmt: skip
    else:
        from transformers import LlamaConfig, Qwen2Config

        config_cls = LlamaConfig if llm.family == "llama" else Qwen2Config
        config = config_cls(
            hidden_size=r.hidden_size, num_hidden_layers=r.num_layers,
            num_attention_heads=r.num_heads, num_key_value_heads=r.num_kv_heads,
            intermediate_size=r.intermediate_size, vocab_size=vocab,
            max_position_embeddings=r.max_positions, tie_word_embeddings=False, **ids,
        )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


class TimmEncoder(nn.Module):
    """A timm backbone under the encoder protocol: images -> tokens [B, N, D] (Swin's NHWC
    feature map flattened to tokens)."""

    def __init__(self, name: str, *, image_size: int, in_chans: int, checkpoint: str | None):
        super().__init__()
        import timm

        self.body: Any

        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
        try:
            self.body = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # models without an img_size argument (CNNs)
            self.body = timm.create_model(name, **kwargs)
        if checkpoint is not None and not _on_meta():
            from raydiology.train.safe_load import weights_only_load

            state = weights_only_load(checkpoint)
            self.body.load_state_dict(state.get("model", state), strict=False)
        self.embed_dim = int(self.body.num_features)
        self.num_prefix_tokens = int(getattr(self.body, "num_prefix_tokens", 0))
        self.in_chans = in_chans
        patch = getattr(getattr(self.body, "patch_embed", None), "patch_size", 32)
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    def forward(self, images: Tensor) -> Tensor:
        x = self.body.forward_features(images)
        if x.ndim == 4:  # [B, H, W, C] (Swin) or [B, C, H, W] (CNN)
            x = x.flatten(1, 2) if x.shape[-1] == self.embed_dim else x.flatten(2).transpose(1, 2)
        return x


def build_vision(cfg: VisionConfig, *, image_size: int, in_chans: int) -> nn.Module:
    """The encoder from its source; an export must match the data's resolution."""
    if cfg.path is not None:
        return _exported_encoder(cfg.path, image_size=image_size, in_chans=in_chans)
    if cfg.timm is not None:
        return TimmEncoder(
            cfg.timm, image_size=image_size, in_chans=in_chans, checkpoint=cfg.timm_checkpoint
        )
    section = dict(cfg.model)
    entry = _model_entry(section.pop("name"), "model.vision.model.name")
    model_cfg: Any = from_dict(entry.config_cls, section, "model.vision.model")
    model = entry.builder(model_cfg, image_size=image_size, in_chans=in_chans)
    return model.encoder


def _exported_encoder(path: str, *, image_size: int, in_chans: int) -> nn.Module:
    import json

    from raydiology.train.export import SPEC, load_encoder

    folder = Path(path).expanduser()
    folder = folder.parent if folder.suffix == ".json" else folder
    if not (folder / SPEC).is_file():
        raise ConfigError("model.vision.path", path, f"an exported encoder folder with {SPEC}")
    spec = json.loads((folder / SPEC).read_text())
    if (spec["image_size"], spec["in_chans"]) != (image_size, in_chans):
        raise ConfigError(
            "data.resolution",
            image_size,
            f"the export's input: {spec['image_size']} px, {spec['in_chans']} channel(s)",
        )
    if _on_meta():  # shapes only: build the exported model's encoder without its weights
        section = dict(spec["model"])
        entry = MODELS.get(section.pop("name"))
        model_cfg: Any = from_dict(entry.config_cls, section, "model")
        return entry.builder(model_cfg, image_size=image_size, in_chans=in_chans).encoder
    return load_encoder(folder).train()


def set_training(
    module: nn.Module,
    mode: TrainMode,
    lora: LoraSettings,
    *,
    default_targets: tuple[str, ...],
    fan_in_fan_out: bool = False,
) -> nn.Module:
    """Freeze, add LoRA adapters (only they train), or leave everything trainable."""
    if mode == "full":
        module.requires_grad_(True)
        return module
    module.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = list(lora.target_modules or default_targets)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,  # GPT-2's Conv1D stores weights transposed
        )
        module = inject_adapter_in_model(config, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    return module


_LORA_TARGETS = {"llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}


@MODELS.register("report_generator", ReportGeneratorConfig)
def build_report_generator(
    cfg: ReportGeneratorConfig,
    *,
    image_size: int,
    in_chans: int,
    tokenizer: ReportTokenizer | None = None,
) -> ReportGenerator:
    """`tokenizer` replaces the configured one (e.g. the tokenizer saved in a run's export)."""
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer_config())
    encoder = build_vision(cfg.vision, image_size=image_size, in_chans=in_chans)
    llm = build_llm(cfg, tokenizer)
    if cfg.llm.gradient_checkpointing:  # renamed in transformers 5
        enable = getattr(llm, "activation_checkpointing_enable", None)
        (enable or llm.gradient_checkpointing_enable)()
    family = getattr(llm.config, "model_type", cfg.llm.family)
    llm = set_training(
        llm,
        cfg.llm.train,
        cfg.llm.lora,
        default_targets=_LORA_TARGETS.get(family, ("q_proj",)),
        fan_in_fan_out=family == "gpt2",
    )
    encoder = set_training(encoder, cfg.vision.train, cfg.vision.lora, default_targets=("qkv",))
    return ReportGenerator(
        encoder,
        llm,
        tokenizer,
        prompt=cfg.prompt,
        image_placeholder=cfg.image_placeholder,
        drop_prefix_tokens=cfg.vision.drop_prefix_tokens,
        llm_from_path=cfg.llm.path is not None,
        llm_train=cfg.llm.train,
    )
