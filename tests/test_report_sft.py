"""Report SFT: sequence assembly, what trains, LLMs from local folders, the 7B shape on the
meta device, and a smoke SFT on phantoms (2 DeepSpeed workers) whose generated reports
state the right findings more often than a most-common-report baseline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from raydiology.config import load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.models.report_generator import (
    PAPER_PROMPT,
    ReportGenerator,
    ReportGeneratorConfig,
    build_report_generator,
)
from raydiology.objectives.report_sft import ReportSFTConfig, build_report_sft
from raydiology.registry import build_model, build_objective
from raydiology.train.schedules import param_groups

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
R2GENGPT = EXPERIMENTS / "r2gengpt.yaml"
STAGE3 = EXPERIMENTS / "mambaxray_vl" / "stage3_sft.yaml"
LLAMA2_7B = 6_738_415_616  # Llama-2-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + ...


def tiny(**section) -> ReportGenerator:
    cfg = from_dict(ReportGeneratorConfig, {"flavor": "tiny", **section}, "model")
    torch.manual_seed(0)
    return build_report_generator(cfg, image_size=64, in_chans=1)


def trainable(module: torch.nn.Module, prefix: str) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad and n.startswith(prefix)}


# ----------------------------------------------------------------------------- sequence


def test_sequence_places_prompt_image_and_report_and_labels_only_the_report():
    model = tiny().eval()
    tok = model.tokenizer
    reports = [tok.encode("The heart is enlarged. No pleural effusion."), tok.encode("Normal.")]
    images = torch.randn(2, 1, 64, 64)
    visual = model.embed_images(images)  # [2, T, H]
    t = visual.shape[1]
    assert t == 1 + (64 // 16) ** 2  # CLS + every patch token: all visual tokens go in
    inputs = model.assemble(visual, reports)

    before, after = PAPER_PROMPT.split("<ImageHere>")
    ids_before = [tok.bos_id, *tok.encode(before, clean=False)]
    ids_after = tok.encode(after, clean=False)
    length = len(ids_before) + t + len(ids_after)  # [BOS] prompt-before <image> prompt-after
    width = max(len(r) for r in reports) + 1  # + EOS
    embeds, labels, mask = inputs["inputs_embeds"], inputs["labels"], inputs["attention_mask"]
    assert embeds.shape == (2, length + width, 64)
    table = model.llm.get_input_embeddings().weight
    a, b = len(ids_before), len(ids_before) + t
    assert torch.equal(embeds[:, :a], table[ids_before].expand(2, -1, -1))
    assert torch.equal(embeds[:, a:b], visual)
    assert torch.equal(embeds[:, b:length], table[ids_after].expand(2, -1, -1))
    for i, report in enumerate(reports):
        n = len(report) + 1
        assert torch.equal(embeds[i, length : length + len(report)], table[report])
        assert labels[i, length : length + n].tolist() == [*report, tok.eos_id]
        assert (labels[i, :length] == -100).all() and (labels[i, length + n :] == -100).all()
        assert mask[i].tolist() == [1] * (length + n) + [0] * (width - n)
    # the loss is the LLM's cross-entropy on those labels: report tokens and EOS only
    loss = model(images, reports)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(loss, manual, atol=1e-5)


def test_objective_tokenizes_reports_on_the_worker_and_truncates():
    model = tiny()
    cfg = from_dict(ReportSFTConfig, {"max_report_tokens": 5}, "objective")
    assert cfg.corpus_columns() == {"report": "report"}
    objective = build_report_sft(cfg, model=model)
    batch = {
        "image": torch.randn(2, 1, 64, 64),
        "report": ["FINDINGS: The heart is enlarged. There is a small left pleural effusion.", ""],
    }
    out = objective(batch)
    assert list(out) == ["loss", "report_tokens"] and out["loss"].requires_grad
    assert out["report_tokens"].item() == ((5 + 1) + (1 + 1)) / 2  # clean("") is " ." -> "."
    out["loss"].backward()
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="report"):
        objective({"image": batch["image"]})
    with pytest.raises(TypeError, match="report_generator"):
        build_report_sft(cfg, model=torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- what trains


def test_frozen_lora_and_full_choose_what_requires_grad():
    projector = {"proj.weight", "proj.bias", "proj_norm.weight", "proj_norm.bias"}
    shallow = tiny()  # R2GenGPT shallow: LLM and encoder frozen, only the projector learns
    assert trainable(shallow, "") == projector

    delta = tiny(vision={"train": "lora"}, llm={"train": "lora"})
    llm_lora, vision_lora = trainable(delta, "llm."), trainable(delta, "encoder.")
    assert llm_lora and all("lora_" in n for n in llm_lora)
    assert {n.split(".")[-4] for n in llm_lora} == {"q_proj", "v_proj"}
    assert {n.split(".")[-4] for n in vision_lora} == {"qkv"}
    assert trainable(delta, "proj") == projector
    # LoRA starts as the identity: B = 0
    assert all(p.abs().sum() == 0 for n, p in delta.named_parameters() if "lora_B" in n)

    deep = tiny(vision={"train": "full"}, llm={"train": "full"})
    assert trainable(deep, "") == {n for n, _ in deep.named_parameters()}

    # what the optimizer gets: trainable parameters only
    objective = build_report_sft(ReportSFTConfig(), model=delta)
    given = {id(p) for g in param_groups(objective, 0.05) for p in g["params"]}
    assert given == {id(p) for p in delta.parameters() if p.requires_grad}


def test_gpt2_and_qwen2_families_build_from_config():
    for family, lora in (("gpt2", "c_attn"), ("qwen2", "q_proj")):
        model = tiny(llm={"family": family, "train": "lora"})
        assert model.llm.config.model_type == family
        assert any(lora in n for n in trainable(model, "llm."))
        loss = model(torch.randn(1, 1, 64, 64), [model.tokenizer.encode("The lungs are clear.")])
        assert torch.isfinite(loss)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        from_dict(ReportGeneratorConfig, {"prompt": "no placeholder"}, "model")
    assert err.value.key == "model.prompt"
    with pytest.raises(ConfigError) as err:
        from_dict(ReportGeneratorConfig, {"vision": {"model": {"name": "nope"}}}, "model")
    assert err.value.key == "model.vision.model.name"
    with pytest.raises(ConfigError) as err:
        from_dict(ReportGeneratorConfig, {"llm": {"family": "t5"}}, "model")
    assert err.value.key == "model.llm.family"
    with pytest.raises(ConfigError) as err:
        tiny(llm={"vocab_size": 10})  # smaller than the phantom tokenizer's vocabulary
    assert err.value.key == "model.llm.vocab_size"
    with pytest.raises(ConfigError) as err:
        load_experiment(R2GENGPT, profile="sft_smoke", overrides=["model.llm.path=/no/such/llm"])
    assert err.value.key == "model.llm.path"


# ----------------------------------------------------------------------------- local LLMs


def test_tiny_llm_saved_with_save_pretrained_loads_through_the_experiment_file(tmp_path):
    """A user's LLM folder (weights + tokenizer, save_pretrained format), named in the
    experiment file: its weights and its own tokenizer are used, nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydiology.data.tokenizers import TokenizerConfig, report_texts, train_tokenizer

    folder = tmp_path / "tiny-llama"
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), report_texts("phantom"))
    tok.hf.save_pretrained(str(folder))  # only the Hugging Face files, as a hub folder has
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=256,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    saved = LlamaForCausalLM(config)
    saved.save_pretrained(str(folder))

    exp = load_experiment(
        R2GENGPT,
        profile="sft_smoke",
        overrides=[f"model.llm.path={folder}", "model.tokenizer=null", "model.llm.train=frozen"],
    )
    model = build_model(exp.model, exp.data)
    assert model.llm.config.hidden_size == 32 and model.proj.out_features == 32
    for name, p in saved.state_dict().items():
        assert torch.equal(model.llm.state_dict()[name], p), name
    assert model.tokenizer.config.kind == "pretrained"
    assert model.tokenizer.hf.get_vocab() == tok.hf.get_vocab()
    assert trainable(model, "llm.") == set()
    objective = build_objective(exp.objective, model)
    batch = {"image": torch.randn(2, 3, 128, 128), "report": ["The heart is normal."] * 2}
    assert torch.isfinite(objective(batch)["loss"])


# ----------------------------------------------------------------------------- paper sizes


@pytest.mark.parametrize(
    ("path", "encoder", "width"),
    [(STAGE3, 84_262_656, 768), (R2GENGPT, 86_743_224, 1024)],  # Vision Mamba-B, Swin-B
)
def test_llama2_7b_shapes_on_the_meta_device(path, encoder, width):
    exp = load_experiment(path)
    with torch.device("meta"):
        model = build_model(exp.model, exp.data)
    counts = {n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()}
    assert counts["llm"] == LLAMA2_7B
    cfg = model.llm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (4096, 32, 32)
    assert (cfg.intermediate_size, cfg.vocab_size) == (11008, 32000)
    assert counts["encoder"] == encoder
    projector = width * 4096 + 4096 + 2 * 4096  # Linear(d -> 4096) + LayerNorm(4096)
    assert counts["proj"] + counts["proj_norm"] == projector
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == LLAMA2_7B + encoder + projector
    assert train == encoder + projector  # LLM frozen, encoder fully trained (deep)


# ----------------------------------------------------------------------------- generation


def test_batched_beam_search_matches_one_image_at_a_time():
    model = tiny().eval()
    images = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = dict(num_beams=3, max_new_tokens=12, min_new_tokens=4, repetition_penalty=2.0)
    batched = model.generate(images, **settings)
    single = [model.generate(images[i : i + 1], **settings)[0] for i in range(3)]
    assert batched == single
    assert all(4 <= len(r.split()) <= 12 for r in batched)


# ----------------------------------------------------------------------------- smoke SFT


def _ce_f1(predictions: list[str], references: list[str]) -> float:
    from raydiology.evaluation.clinical import ce_scores
    from raydiology.evaluation.labeler import label_reports

    return float(ce_scores(label_reports(predictions), label_reports(references))["ce_f1_micro"])


@pytest.mark.ray
def test_smoke_sft_on_phantoms_learns_and_generates_findings(ray_cluster, tmp_path):
    from rich.console import Console

    from raydiology.evaluation.generate import generate_reports
    from raydiology.train.launch import read_metrics, resolve_corpus, run_experiment

    exp = load_experiment(
        R2GENGPT,
        profile="sft_smoke",
        overrides=[
            f"output.dir={tmp_path}",
            "data.phantom.images=320",
            "train.max_steps=150",
            "train.micro_batch_size=8",
            "train.optimizer.lr=2.0e-3",
            "train.log_every=10",
            "train.checkpoint_every=150",
        ],
    )
    result = run_experiment(exp, console=Console(quiet=True))
    losses = [r["loss"] for r in read_metrics(result.run_dir)]
    assert losses[-1] < 0.6 * losses[0], losses

    export = result.run_dir / "export"
    spec = json.loads((export / "generator.json").read_text())
    assert spec["parameters"]["trainable"] == spec["parameters"]["total"]  # sft_smoke: all
    assert (export / "tokenizer" / "tokenizer.json").is_file()

    corpus = resolve_corpus(exp, console=Console(quiet=True))
    rows = generate_reports(result.run_dir, corpus, split="test")
    eval_dir = result.run_dir / "eval"
    written = [json.loads(line) for line in (eval_dir / "predictions.jsonl").open()]
    assert written == rows and len(rows) >= 20
    info = json.loads((eval_dir / "run.json").read_text())
    assert info["trainable_params"] == spec["parameters"]["trainable"] and info["test_time_s"] > 0
    assert (info["encoder"], info["decoder"]) == ("resnet10t", "llama/tiny")
    assert set(rows[0]) == {"id", "reference", "prediction", "image"}  # image: a thumbnail
    assert (eval_dir / rows[0]["image"]).is_file()
    # the same through the command line, first two images only
    from typer.testing import CliRunner

    from raydiology.cli import app

    cli_out = tmp_path / "cli" / "predictions.jsonl"
    args = ["generate", str(result.run_dir), corpus, "--limit", "2", "--out", str(cli_out)]
    ran = CliRunner().invoke(app, args, catch_exceptions=False)
    assert ran.exit_code == 0, ran.output
    assert [json.loads(line) for line in cli_out.open()] == rows[:2]

    references = [r["reference"] for r in rows]
    predictions = [r["prediction"] for r in rows]
    most_common = Counter(references).most_common(1)[0][0]
    model_f1 = _ce_f1(predictions, references)
    baseline_f1 = _ce_f1([most_common] * len(rows), references)
    print(f"CE micro F1: model {model_f1:.3f}, most-common-report baseline {baseline_f1:.3f}")
    assert model_f1 > baseline_f1 + 0.15, (model_f1, baseline_f1, rows[:3])
