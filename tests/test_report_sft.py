"""Report SFT: sequence assembly, what trains, LLMs from local folders (also built
partitioned under ZeRO-3), the 7B shape on the meta device, and a smoke SFT on phantoms
(2 DeepSpeed workers) that validates while it trains, exports its best checkpoint, and
whose generated reports state the right findings more often than a most-common-report
baseline."""

from __future__ import annotations

import json
import math
import os
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
from raydiology.objectives.report_sft import ReportSFTConfig, build_report_sft, count_trainable
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


def save_tiny_llama(folder: Path):
    """A tiny Llama and its BPE tokenizer in save_pretrained format, as a hub folder holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydiology.data.tokenizers import TokenizerConfig, report_texts, train_tokenizer

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
    return saved, tok


def test_tiny_llm_saved_with_save_pretrained_loads_through_the_experiment_file(tmp_path):
    """A user's LLM folder (weights + tokenizer, save_pretrained format), named in the
    experiment file: its weights and its own tokenizer are used, nothing is downloaded."""
    folder = tmp_path / "tiny-llama"
    saved, tok = save_tiny_llama(folder)

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


def _zero3_worker(folder: str, port: int, export: str, out) -> None:
    """One DeepSpeed rank (gloo, world 1) building, training, validating and exporting the
    generator under ZeRO-3; reports what it saw through `out`."""
    import traceback

    try:
        import deepspeed
        import torch.distributed as dist

        from raydiology.train.deepspeed_config import deepspeed_config
        from raydiology.train.loop import build_for_training

        # what Ray Train's torch backend sets on every worker
        os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        exp = load_experiment(
            R2GENGPT,
            profile="sft_smoke",
            overrides=[
                f"model.llm.path={folder}", "model.tokenizer=null", "model.llm.train=lora",
                "train.zero_stage=3", "objective.generation.max_new_tokens=8",
            ],
        )  # fmt: skip
        ds_config = deepspeed_config(exp.train, world_size=1, on_gpu=False)
        model, objective, zero3 = build_for_training(exp, ds_config)
        base = {n: p for n, p in model.llm.named_parameters() if "lora_" not in n}
        seen = {
            "zero3": zero3 is not None,
            # the LLM was partitioned as it was built; the encoder waits for initialize
            "llm_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in base.values()),
            "encoder_whole": not any(hasattr(p, "ds_id") for p in model.encoder.parameters()),
            "width": model.proj.out_features,
        }
        with deepspeed.zero.GatheredParameters(list(base.values())):
            loaded = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().numpy().copy()
                      for n, p in base.items()}  # fmt: skip
        seen["loaded"] = loaded
        engine, *_ = deepspeed.initialize(
            model=objective,
            model_parameters=param_groups(objective, exp.train.optimizer.weight_decay),
            config=ds_config,
        )
        batch = {"image": torch.randn(2, 3, 128, 128), "report": ["The heart is normal."] * 2}
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        seen["loss"] = float(loss.detach())
        seen["rows"] = engine.module.validation_rows(batch, synced_gpus=False)
        engine.module.export_extra(Path(export), write=True, gather=True)
        out.put(("ok", seen))
        dist.destroy_process_group()
    except BaseException:
        out.put(("error", traceback.format_exc()))


def test_zero3_builds_the_llm_partitioned_and_still_trains_validates_and_exports(tmp_path):
    """ZeRO-3 on one CPU rank (gloo over two would race): the LLM from a local folder is
    built inside zero.Init with the run's DeepSpeed config and loaded shard by shard (its
    weights are the saved ones), and training, validation and export work on it."""
    import socket

    import torch.multiprocessing as mp

    folder = tmp_path / "tiny-llama"
    saved, _ = save_tiny_llama(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")  # a fresh process: DeepSpeed keeps global state
    out = context.Queue()
    export = tmp_path / "export"
    process = context.Process(target=_zero3_worker, args=(str(folder), port, str(export), out))
    process.start()
    status, seen = out.get(timeout=300)
    process.join(timeout=60)
    assert status == "ok", seen
    assert seen["zero3"] and seen["llm_partitioned"] and seen["encoder_whole"]
    assert seen["width"] == 32
    for name, p in saved.state_dict().items():
        assert torch.equal(torch.from_numpy(seen["loaded"][name]), p), name
    assert math.isfinite(seen["loss"])
    assert len(seen["rows"]) == 2 and all(
        set(r) == {"reference", "prediction"} for r in seen["rows"]
    )
    spec = json.loads((export / "generator.json").read_text())
    # full sizes although the rank holds partitions: the same counts as a plain build
    exp = load_experiment(
        R2GENGPT,
        profile="sft_smoke",
        overrides=[f"model.llm.path={folder}", "model.tokenizer=null", "model.llm.train=lora"],
    )
    assert spec["parameters"] == count_trainable(build_model(exp.model, exp.data))


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

    from raydiology.data.corpus import read_rows
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
            "train.eval_every=50",  # validate (and checkpoint) at steps 50, 100 and 150
        ],
    )
    result = run_experiment(exp, console=Console(quiet=True))
    metrics = read_metrics(result.run_dir)
    losses = [r["loss"] for r in metrics]
    assert losses[-1] < 0.6 * losses[0], losses

    # validation: the val split decoded at each validation step, every rank reporting
    validated = [r for r in metrics if "val_score" in r]
    assert [r["step"] for r in validated] == [50, 100, 150]
    assert all("checkpoint" in r for r in validated)  # every validation is checkpointed
    assert not any("val_BLEU_4" in r for r in metrics if r["step"] % 50)
    corpus = resolve_corpus(exp, console=Console(quiet=True))
    val_rows = sum(1 for r in read_rows(corpus).column("split").to_pylist() if r == "val")
    for r in validated:
        assert r["val_reports"] == val_rows - val_rows % 2  # split equally over 2 workers
        assert r["val_score"] == pytest.approx(0.5 * r["val_BLEU_4"] + 0.5 * r["val_CIDEr"])
    print("validation:", [(r["step"], round(r["val_score"], 4)) for r in validated])
    assert validated[-1]["val_BLEU_4"] > 0.05, validated  # it learnt to write the reports
    # the run's export is the best checkpoint's (the later one on a tie, as Ray ranks them)
    best = max(validated, key=lambda r: (r["val_score"], r["step"]))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["selected"]["step"] == best["step"]
    assert summary["selected"]["val_score"] == best["val_score"]
    assert summary["selected"]["checkpoint"] == best["checkpoint"]
    export = result.run_dir / "export"
    assert json.loads((export / "encoder.json").read_text())["step"] == best["step"]

    spec = json.loads((export / "generator.json").read_text())
    assert spec["parameters"]["trainable"] == spec["parameters"]["total"]  # sft_smoke: all
    assert (export / "tokenizer" / "tokenizer.json").is_file()

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
