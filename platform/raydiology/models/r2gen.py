"""R2Gen (Chen et al., EMNLP 2020, "Generating Radiology Reports via Memory-driven
Transformer"): a Transformer encoder-decoder over a visual extractor's patch features, whose
decoder layer norms are conditioned on a relational memory (MCLN).

    images [B, C, R, R] (a study: [B, V, C, R, R] + view_mask [B, V]) -> visual extractor ->
    patch features [B, N, d_vf] (a study's views concatenated along N, as R2Gen does with IU
    X-ray's two views) -> Linear + ReLU + Dropout -> encoder -> hidden [B, N, d]

    [BOS] report [B, S] -> embedding * sqrt(d) + sinusoid -> relational memory, one step per
    token -> memory [B, S, slots * d_rm]; decoder layers (self-attention, cross-attention to
    hidden, feed-forward, each behind an MCLN conditioned on the memory) -> logits [B, S, V]

The visual extractor is any raydiology encoder, from report_generator's `vision` section (an
export `vision.path`, a timm model, or a registry model); R2Gen's own is an ImageNet
ResNet-101 (`vision.timm: resnet101`). The vocabulary is the project's `word` tokenizer, which
reproduces R2Gen's cleaning and frequency threshold. `report_sft` trains it as it trains
report_generator: `forward(images, reports, view_mask) -> loss` and `generate(images, ...)`.

Facts from the official code (github.com/zhjohnchan/R2Gen, commit e8cd3cf) are cited by file
and line (a bare "l." is modules/encoder_decoder.py's); the code here is written anew.
Shapes: B batch, V views, N visual tokens, d model width, S report tokens + 1, K beams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.data.tokenizers import ReportTokenizer, TokenizerConfig, build_tokenizer
from raydiology.models.report_generator import (
    VisionConfig,
    build_vision,
    encode_views,
    set_training,
)
from raydiology.registry import MODELS


@dataclass(frozen=True, kw_only=True)
class R2GenArgs:
    """The numbers that size one R2Gen encoder-decoder (one row of the flavors table)."""

    d_model: int
    d_ff: int
    num_layers: int  # encoder layers = decoder layers
    num_heads: int
    dropout: float
    rm_num_slots: int
    rm_num_heads: int
    rm_d_model: int
    drop_prob_lm: float  # dropout after the patch features' projection


R2GEN_FLAVORS: dict[str, R2GenArgs] = {
    # main_train.py defaults, both datasets (train_*.sh override none of them):
    # --d_model 512 (l.32), --d_ff 512 (l.33), --num_layers 3 (l.36), --num_heads 8 (l.35),
    # --dropout 0.1 (l.37), --rm_num_slots 3 (l.45), --rm_num_heads 8 (l.46),
    # --rm_d_model 512 (l.47), --drop_prob_lm 0.5 (l.43, att_model.py l.58-62's att_embed).
    "paper": R2GenArgs(
        d_model=512, d_ff=512, num_layers=3, num_heads=8, dropout=0.1,
        rm_num_slots=3, rm_num_heads=8, rm_d_model=512, drop_prob_lm=0.5,
    ),
    # CPU tests and smoke runs.
    "tiny": R2GenArgs(
        d_model=64, d_ff=64, num_layers=1, num_heads=4, dropout=0.1,
        rm_num_slots=3, rm_num_heads=4, rm_d_model=64, drop_prob_lm=0.1,
    ),
}  # fmt: skip

ViewCombine = Literal["concat", "mean"]


@dataclass(kw_only=True)
class R2GenConfig:
    """The `model` section for ``name: r2gen``."""

    flavor: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    # R2Gen's vocabulary: words of the cleaned reports seen at least `min_freq` times
    # (main_train.py --threshold 3 for IU X-ray, 10 for MIMIC-CXR in train_mimic_cxr.sh)
    tokenizer: TokenizerConfig = field(
        default_factory=lambda: TokenizerConfig(kind="word", train_reports="phantom", min_freq=1)
    )
    # How a study's views meet: R2Gen concatenates the two IU X-ray views' patch features
    # along the token axis (models/r2gen.py l.27-30, forward_iu_xray); `mean` averages them
    # as report_generator does. (R2Gen also concatenates the pooled features, along the
    # channels, but never uses them: encoder_decoder.py l.344-349 encodes patches only.)
    views: ViewCombine = "concat"
    # The visual extractor's learning rate relative to the rest: R2Gen trains it at lr_ve
    # 5e-5 and the encoder-decoder at lr_ed 1e-4 (main_train.py l.71-72, optimizers.py)
    vision_lr_scale: float = 0.5

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            self.flavor in R2GEN_FLAVORS,
            f"{k}flavor",
            self.flavor,
            "one of the flavors " + ", ".join(R2GEN_FLAVORS),
        )
        self.vision.validate(f"{k}vision")
        check(self.vision_lr_scale > 0, f"{k}vision_lr_scale", self.vision_lr_scale, "> 0")
        r = R2GEN_FLAVORS[self.flavor]
        # the memory attends over [slots; token embedding] and its gates read the embedding
        # (encoder_decoder.py l.276-282): one width for both
        check(r.rm_d_model == r.d_model, f"{k}flavor", self.flavor, "rm_d_model == d_model")

    def tokenizer_slot(self) -> tuple[Any, TokenizerConfig]:
        """(the config whose `tokenizer` is set, its tokenizer): see train.launch.pin_tokenizer."""
        return self, self.tokenizer


# ----------------------------------------------------------------------------- parts


def _standardize(x: Tensor, eps: float) -> Tensor:
    """R2Gen's normalisation: (x - mean) / (std + eps) with the unbiased std
    (encoder_decoder.py l.100-103), not torch's sqrt(var + eps)."""
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:  # eps: encoder_decoder.py l.94
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * _standardize(x, self.eps) + self.beta


class ConditionalLayerNorm(nn.Module):
    """MCLN: x [B, S, d] + memory [B, S, m] -> layer norm whose scale and shift each get a
    memory-dependent delta from a two-layer MLP (encoder_decoder.py l.144-179)."""

    def __init__(self, dim: int, memory_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.mlp_gamma = nn.Sequential(nn.Linear(memory_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.mlp_beta = nn.Sequential(nn.Linear(memory_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        for m in self.modules():  # l.161-164 (the model-wide xavier init redoes the weights)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.1)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        gamma = self.gamma + self.mlp_gamma(memory)
        beta = self.beta + self.mlp_beta(memory)
        return gamma * _standardize(x, self.eps) + beta


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (encoder_decoder.py l.182-203).

    mask: bool, True = may attend, broadcast to [B, heads, Lq, Lk]: [B, 1, 1, Lk] for keys,
    [Lq, Lk] for the causal mask."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: Tensor, key: Tensor, mask: Tensor | None = None) -> Tensor:
        def split(x: Tensor) -> Tensor:  # [B, L, d] -> [B, h, L, d/h]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        x = F.scaled_dot_product_attention(
            split(self.q(query)),
            split(self.k(key)),
            split(self.v(key)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(x.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:  # l.206-214
        super().__init__(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and feed-forward, residual dropout (l.70-90)."""

    def __init__(self, r: R2GenArgs) -> None:
        super().__init__()
        self.attn = Attention(r.d_model, r.num_heads, r.dropout)
        self.ff = FeedForward(r.d_model, r.d_ff, r.dropout)
        self.norm1, self.norm2 = LayerNorm(r.d_model), LayerNorm(r.d_model)
        self.drop = nn.Dropout(r.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention to the encoder, feed-forward; each sublayer's norm is
    an MCLN on the relational memory (l.118-141)."""

    def __init__(self, r: R2GenArgs) -> None:
        super().__init__()
        memory_dim = r.rm_num_slots * r.rm_d_model
        self.self_attn = Attention(r.d_model, r.num_heads, r.dropout)
        self.cross_attn = Attention(r.d_model, r.num_heads, r.dropout)
        self.ff = FeedForward(r.d_model, r.d_ff, r.dropout)
        self.norms = nn.ModuleList(ConditionalLayerNorm(r.d_model, memory_dim) for _ in range(3))
        self.drop = nn.Dropout(r.dropout)

    def forward(
        self, x: Tensor, hidden: Tensor, hidden_mask: Tensor | None, causal: Tensor, memory: Tensor
    ) -> Tensor:
        h = self.norms[0](x, memory)
        x = x + self.drop(self.self_attn(h, h, causal))
        x = x + self.drop(self.cross_attn(self.norms[1](x, memory), hidden, hidden_mask))
        return x + self.drop(self.ff(self.norms[2](x, memory)))


class RelationalMemory(nn.Module):
    """A few memory slots updated once per report token (encoder_decoder.py l.246-300).

    Each step the slots attend over [slots; token], add an MLP, and a gate mixes the result
    with the old slots: M' = sigmoid(i) * tanh(M~) + sigmoid(f) * M, with (i, f) =
    W token + U tanh(M) — an LSTM-like input/forget pair per slot and channel.
    """

    def __init__(self, num_slots: int, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.num_slots, self.dim = num_slots, dim
        self.attn = Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.W = nn.Linear(dim, 2 * dim)
        self.U = nn.Linear(dim, 2 * dim)

    def initial(self, batch: int, like: Tensor) -> Tensor:
        """[B, slots, d]: each slot one row of the identity, zero-padded (l.263-272)."""
        eye = torch.eye(self.num_slots, self.dim, dtype=like.dtype, device=like.device)
        return eye.expand(batch, -1, -1)

    def step(self, token: Tensor, memory: Tensor) -> Tensor:
        """token [B, d], memory [B, slots, d] -> the next memory [B, slots, d]."""
        token = token[:, None]
        update = memory + self.attn(memory, torch.cat([memory, token], dim=1))
        update = update + self.mlp(update)
        input_gate, forget_gate = (
            (self.W(token) + self.U(torch.tanh(memory))).sigmoid().chunk(2, -1)
        )
        return input_gate * torch.tanh(update) + forget_gate * memory

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, S, d] -> the memory after each token, flattened: [B, S, slots * d]."""
        memory = self.initial(tokens.shape[0], tokens)
        states = []
        for i in range(tokens.shape[1]):
            memory = self.step(tokens[:, i], memory)
            states.append(memory.flatten(1))
        return torch.stack(states, dim=1)


def sinusoid(length: int, dim: int, *, like: Tensor) -> Tensor:
    """The Transformer's sine/cosine position table [length, dim] (l.227-243)."""
    position = torch.arange(length, dtype=torch.float32, device=like.device)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=like.device) * (-math.log(1e4) / dim)
    )
    table = torch.zeros(length, dim, device=like.device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table.to(like.dtype)


# ----------------------------------------------------------------------------- the module


class R2Gen(nn.Module):
    """images [B, C, R, R] (or [B, V, C, R, R]) + report token ids -> loss; or -> reports."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: ReportTokenizer,
        args: R2GenArgs,
        *,
        views: ViewCombine = "concat",
        drop_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer  # not a module: travels with the export, not the state_dict
        self.views = views
        self.d_model = d = args.d_model
        vocab = tokenizer.vocab_size
        self.encoder = encoder  # the visual extractor (what an export saves)
        self.drop_prefix = (
            int(getattr(encoder, "num_prefix_tokens", 0)) if drop_prefix_tokens else 0
        )
        # patch features -> d (att_model.py l.58-63; use_bn 0 by default, main_train.py l.42)
        self.att_embed = nn.Sequential(
            nn.Linear(int(encoder.embed_dim), d),  # type: ignore[arg-type]
            nn.ReLU(),
            nn.Dropout(args.drop_prob_lm),
        )
        self.encoder_layers = nn.ModuleList(EncoderLayer(args) for _ in range(args.num_layers))
        self.encoder_norm = LayerNorm(d)
        self.embed = nn.Embedding(vocab, d)
        self.embed_dropout = nn.Dropout(args.dropout)  # after the position table (l.242)
        self.memory = RelationalMemory(args.rm_num_slots, args.rm_d_model, args.rm_num_heads,
                                       args.dropout)  # fmt: skip
        self.decoder_layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.decoder_norm = LayerNorm(d)
        self.logit = nn.Linear(d, vocab)
        # xavier on every matrix of the Transformer (encoder_decoder.py l.319-321); the
        # visual extractor, att_embed and logit keep torch's defaults, as there
        for part in (self.encoder_layers, self.embed, self.memory, self.decoder_layers):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    # -- encoder --------------------------------------------------------------------------

    def encode(
        self, images: Tensor, view_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """images [B, C, R, R] or [B, V, C, R, R] -> hidden [B, N, d] and its token mask
        [B, N] (False on a padded view's tokens; None when every token is real)."""
        feats, mask = encode_views(
            self.encoder, images, view_mask, drop_prefix=self.drop_prefix, combine=self.views
        )
        x = self.att_embed(feats)
        keys = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, N]
        for layer in self.encoder_layers:
            x = layer(x, keys)
        return self.encoder_norm(x), mask

    # -- decoder --------------------------------------------------------------------------

    def decode(self, ids: Tensor, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """ids [B, S] (BOS first) + hidden [B, N, d] -> logits [B, S, vocab]."""
        s = ids.shape[1]
        x = self.embed(ids) * math.sqrt(self.d_model)
        x = self.embed_dropout(x + sinusoid(s, self.d_model, like=x))
        # R2Gen embeds the targets twice, once for the memory and once for the decoder
        # (l.53-55); one embedding is the same function (only dropout's draw differs)
        memory = self.memory(x)
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        keys = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, N]
        for layer in self.decoder_layers:
            x = layer(x, hidden, keys, causal, memory)
        return self.logit(self.decoder_norm(x))

    def teacher_forcing(
        self, reports: list[list[int]], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Report ids (no specials) -> inputs [BOS, report] and targets [report, EOS], both
        [B, S]; targets are -100 on the right padding."""
        tok = self.tokenizer
        width = max(len(r) for r in reports) + 1
        inputs = torch.full((len(reports), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(reports), width), -100, dtype=torch.long)
        for i, ids in enumerate(reports):
            inputs[i, : len(ids) + 1] = torch.tensor([tok.bos_id, *ids])
            targets[i, : len(ids) + 1] = torch.tensor([*ids, tok.eos_id])
        return inputs.to(device), targets.to(device)

    def forward(
        self, images: Tensor, reports: list[list[int]], view_mask: Tensor | None = None
    ) -> Tensor:
        """images + report ids (without EOS) -> mean cross-entropy over report tokens + EOS
        (R2Gen's masked NLL, modules/loss.py)."""
        hidden, mask = self.encode(images, view_mask)
        inputs, targets = self.teacher_forcing(reports, hidden.device)
        logits = self.decode(inputs, hidden, mask)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # -- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        *,
        num_beams: int = 3,
        max_new_tokens: int = 60,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 0.0,
        no_repeat_ngram_size: int = 0,
        synced_gpus: bool = False,
        view_mask: Tensor | None = None,
    ) -> list[str]:
        """images [B, ...] -> B reports by beam search (num_beams 1: greedy).

        The settings mean what they mean in Hugging Face's `generate` (report_generator's
        interface): a finished hypothesis scores sum(log p) / length ** length_penalty, and
        the penalties are its logits processors. R2Gen's own decoding is beam 3
        (main_train.py --beam_size 3, l.51), up to max_seq_length tokens, no length penalty
        (caption_model.py l.116, penalty_builder('')), no repetition rules in beam search.
        Like R2Gen (encoder_decoder.py l.379-387) each step re-runs the decoder over the prefix: no cache.
        `synced_gpus` runs all `max_new_tokens` steps so every ZeRO-3 rank forwards alike.
        """
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
        )

        tok, k = self.tokenizer, num_beams
        hidden, mask = self.encode(images, view_mask)
        b, device = hidden.shape[0], hidden.device
        hidden = hidden.repeat_interleave(k, dim=0)  # [B*K, N, d]
        mask = None if mask is None else mask.repeat_interleave(k, dim=0)
        processors = LogitsProcessorList()
        if min_new_tokens > 0:
            processors.append(MinNewTokensLengthLogitsProcessor(1, min_new_tokens, tok.eos_id,
                                                                device=str(device)))  # fmt: skip
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
        never = sorted({tok.bos_id, tok.pad_id} - {tok.eos_id})  # never a training target

        seqs = torch.full((b * k, 1), tok.bos_id, dtype=torch.long, device=device)
        scores = torch.zeros(b, k, device=device)
        scores[:, 1:] = -math.inf  # the first step expands one beam, not K copies of it
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new_tokens):
            logits = self.decode(seqs, hidden, mask)[:, -1].float()
            logprobs = processors(seqs, F.log_softmax(logits, dim=-1))  # type: ignore[arg-type]
            logprobs[:, never] = -math.inf
            vocab = logprobs.shape[-1]
            candidates = (scores[:, :, None] + logprobs.view(b, k, vocab)).view(b, k * vocab)
            top, index = candidates.topk(2 * k, dim=1)  # K of them survive even if K end here
            next_rows, next_tokens, next_scores = [], [], []
            for i in range(b):
                kept: list[tuple[int, int, float]] = []  # (beam, token, score)
                pairs = zip(top[i].tolist(), index[i].tolist(), strict=True)
                for rank, (score, flat) in enumerate(pairs):
                    if done[i] or len(kept) == k:
                        break
                    beam, token = divmod(flat, vocab)
                    if token != tok.eos_id:
                        kept.append((beam, token, score))
                    elif rank < k and score > -math.inf:  # outside the top K: no ending (HF)
                        ids = seqs[i * k + beam, 1:].tolist()
                        finished[i].append((score / (step + 1) ** length_penalty, ids))
                # a finished row steps dead beams along: one batch for all rows
                kept += [(0, tok.eos_id, -math.inf)] * (k - len(kept))
                next_rows += [i * k + beam for beam, _, _ in kept]
                next_tokens += [token for _, token, _ in kept]
                next_scores += [score for _, _, score in kept]
                best_running = max(s for _, _, s in kept) / (step + 1) ** length_penalty
                if len(finished[i]) >= k and best_running <= min(
                    sorted(s for s, _ in finished[i])[-k:]
                ):
                    done[i] = True  # no running beam can beat the K best endings
            rows = torch.tensor(next_rows, device=device)
            tokens = torch.tensor(next_tokens, device=device)
            seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
            scores = torch.tensor(next_scores, device=device).view(b, k)
            if all(done) and not synced_gpus:
                break
        reports = []
        for i in range(b):
            pool = list(finished[i])
            if not done[i]:  # out of steps: the running beams count as they stand
                length = seqs.shape[1] - 1
                for j in range(k):
                    if scores[i, j] > -math.inf:
                        pool.append((scores[i, j].item() / length**length_penalty,
                                     seqs[i * k + j, 1:].tolist()))  # fmt: skip
            reports.append(tok.decode(max(pool, key=lambda p: p[0])[1]))
        return reports


# ----------------------------------------------------------------------------- building


@MODELS.register("r2gen", R2GenConfig)
def build_r2gen(
    cfg: R2GenConfig,
    *,
    image_size: int,
    in_chans: int,
    tokenizer: ReportTokenizer | None = None,
) -> R2Gen:
    """`tokenizer` replaces the configured one (e.g. the tokenizer saved in a run's export)."""
    tokenizer = tokenizer or build_tokenizer(cfg.tokenizer)
    encoder = build_vision(cfg.vision, image_size=image_size, in_chans=in_chans)
    # R2Gen fine-tunes its visual extractor (optimizers.py: its own parameter group)
    encoder = set_training(encoder, cfg.vision.train, cfg.vision.lora, default_targets=("qkv",))
    for p in encoder.parameters():  # read by train.schedules.param_groups
        p._lr_scale = cfg.vision_lr_scale  # type: ignore[attr-defined]
    return R2Gen(
        encoder,
        tokenizer,
        R2GEN_FLAVORS[cfg.flavor],
        views=cfg.views,
        drop_prefix_tokens=cfg.vision.drop_prefix_tokens,
    )
