"""R2Gen: the paper flavor's size on the meta device, the relational memory's gates, MCLN's
conditioning, two views concatenated along the token axis, greedy and beam decoding, and
training through the real `report_sft` objective on phantom studies (PA + LATERAL), then
reports from its export with `generate_reports`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raydiology.config import load_experiment, save_resolved
from raydiology.config_base import ConfigError, from_dict
from raydiology.models import count_parameters
from raydiology.models.r2gen import (
    R2GEN_FLAVORS,
    ConditionalLayerNorm,
    R2Gen,
    R2GenConfig,
    RelationalMemory,
    build_r2gen,
)
from raydiology.objectives.report_sft import build_report_sft

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "r2gen_iu.yaml"
RESNET101_TRUNK = 42_500_160  # torchvision/timm ResNet-101 without its fc (R2Gen's extractor)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: one thread avoids contention (4 s -> 0.2 s a
    training step here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**section) -> R2Gen:
    cfg = from_dict(R2GenConfig, {"flavor": "tiny", **section}, "model")
    torch.manual_seed(0)
    return build_r2gen(cfg, image_size=64, in_chans=1)


def decoder_params(vocab: int, d: int = 512, ff: int = 512, layers: int = 3, slots: int = 3,
                   d_vf: int = 2048) -> int:  # fmt: skip
    """R2Gen's encoder-decoder by hand (encoder_decoder.py make_model, att_model.py att_embed)."""
    linear = d * d + d
    attention, feed_forward, norm = 4 * linear, 2 * (d * ff) + ff + d, 2 * d
    mcln = norm + 2 * ((slots * d) * d + d + linear)
    memory = attention + 2 * linear + 2 * (d * 2 * d + 2 * d)
    encoder = layers * (attention + feed_forward + 2 * norm) + norm
    decoder = layers * (2 * attention + feed_forward + 3 * mcln) + norm
    return (d_vf * d + d) + encoder + memory + decoder + vocab * d + (d * vocab + vocab)


# ----------------------------------------------------------------------------- size


def test_paper_flavor_matches_the_official_sizes_on_the_meta_device():
    r = R2GEN_FLAVORS["paper"]
    assert (r.d_model, r.d_ff, r.num_layers, r.num_heads, r.dropout) == (512, 512, 3, 8, 0.1)
    assert (r.rm_num_slots, r.rm_num_heads, r.rm_d_model) == (3, 8, 512)
    # the experiment file: ResNet-101 on two 224-px views, the word vocabulary of the Open-I
    # (IU X-ray) reports at R2Gen's threshold 3
    exp = load_experiment(EXPERIMENT)
    assert exp.model.name == "r2gen" and exp.data.study_views == 2
    with torch.device("meta"):
        model = build_r2gen(exp.model.config, image_size=224, in_chans=3)
    counts = count_parameters(model)
    vocab = model.tokenizer.vocab_size
    assert vocab == 1253
    assert counts["encoder"] == RESNET101_TRUNK
    assert counts["total"] - counts["encoder"] == decoder_params(vocab) == 36_477_669
    assert counts["total"] == 78_977_829
    assert model.encoder(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 49, 2048)


def test_step_schedule_decays_as_r2gens_steplr():
    from raydiology.train.schedules import lr_factor

    exp = load_experiment(EXPERIMENT)
    train = exp.train
    # 100 epochs of 130 steps, x0.1 after 50 epochs (train_iu_xray.sh), as torch's StepLR
    assert (train.max_steps, train.schedule.step_size) == (100 * 130, 50 * 130)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.optimizer.lr)
    steplr = torch.optim.lr_scheduler.StepLR(opt, train.schedule.step_size, gamma=0.1)
    for step in range(train.max_steps):
        if step % 1300 in (0, 1299):
            factor = lr_factor(step, schedule=train.schedule, base_lr=1e-4, max_steps=13000)
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * factor), step
        opt.step()
        steplr.step()
    with pytest.raises(ConfigError) as err:
        load_experiment(EXPERIMENT, overrides=["train.schedule.gamma=0"])
    assert err.value.key == "train.schedule.gamma"


def test_visual_extractor_trains_at_half_the_decoders_rate():
    from raydiology.config import OptimizerConfig
    from raydiology.train.schedules import param_groups

    exp = load_experiment(EXPERIMENT, profile="r2gen_smoke", overrides=["data.resolution=64"])
    lr = exp.train.optimizer.lr
    objective = build_report_sft(
        exp.objective.config, model=build_r2gen(exp.model.config, image_size=64, in_chans=3)
    )
    groups = param_groups(objective, 5e-5, OptimizerConfig(lr=lr))
    assert [g.get("lr") for g in groups] == [None, None, lr / 2, lr / 2]  # lr_ve = lr_ed / 2
    encoder = {id(p) for p in objective.model.encoder.parameters()}
    for g in groups:
        assert all((id(p) in encoder) == ("lr" in g) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(objective.parameters()))
    # what the training loop builds: each group's rate follows the schedule from its own
    opt = torch.optim.AdamW(groups, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr / 10] * 2 + [lr / 20] * 2)
    assert schedule.get_last_lr()[0] == pytest.approx(lr / 10)  # what the loop logs


def test_config_is_checked():
    with pytest.raises(ConfigError) as err:
        from_dict(R2GenConfig, {"flavor": "huge"}, "model")
    assert err.value.key == "model.flavor"
    with pytest.raises(ConfigError) as err:
        from_dict(R2GenConfig, {"views": "stack"}, "model")
    assert err.value.key == "model.views"


# ----------------------------------------------------------------------------- parts


def test_relational_memory_gates_keep_or_replace_the_slots():
    torch.manual_seed(0)
    rm = RelationalMemory(num_slots=3, dim=8, heads=2, dropout=0.0).eval()
    tokens = torch.randn(2, 5, 8)
    start = rm.initial(2, tokens)
    assert torch.equal(start[0], torch.eye(3, 8))  # one identity row a slot, zero-padded
    d = 8
    with torch.no_grad():
        rm.W.weight.zero_()
        rm.U.weight.zero_()
        rm.U.bias.zero_()
        rm.W.bias[:d], rm.W.bias[d:] = -50.0, 50.0  # input gate shut, forget gate open
        kept = rm(tokens)
        assert kept.shape == (2, 5, 3 * 8)
        torch.testing.assert_close(kept[:, -1], start.flatten(1))  # nothing gets in
        rm.W.bias[:d], rm.W.bias[d:] = 50.0, -50.0  # input gate open, forget gate shut
        replaced = rm(tokens)
        one = rm.step(tokens[:, 0], start)
        torch.testing.assert_close(replaced[:, 0], one.flatten(1))
        # the new slots are tanh of the attention update alone: inside (-1, 1), and they
        # depend on the tokens read
        assert replaced.abs().max() < 1 and not torch.allclose(replaced, kept)
        other = rm(tokens.flip(1))
        assert not torch.allclose(other[:, -1], replaced[:, -1])


def test_mcln_is_a_layer_norm_shifted_and_scaled_by_the_memory():
    torch.manual_seed(0)
    norm = ConditionalLayerNorm(16, memory_dim=3 * 16)
    x = torch.randn(2, 4, 16)
    a, b = torch.randn(2, 4, 48), torch.randn(2, 4, 48)
    assert not torch.allclose(norm(x, a), norm(x, b))  # the memory conditions the output
    with torch.no_grad():  # without the memory's deltas: R2Gen's plain layer norm
        for mlp in (norm.mlp_gamma, norm.mlp_beta):
            mlp[2].weight.zero_()
            mlp[2].bias.zero_()
    plain = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x, a), plain)
    torch.testing.assert_close(norm(x, b), plain)


def test_the_decoder_reads_the_memory_through_mcln():
    model = tiny().eval()
    images = torch.randn(2, 1, 64, 64)
    ids = torch.tensor([[model.tokenizer.bos_id, 5, 6, 7]] * 2)
    with torch.no_grad():
        hidden, mask = model.encode(images)
        before = model.decode(ids, hidden, mask)
        model.memory.W.bias.add_(3.0)  # other gates -> another memory; nothing else changes
        assert not torch.allclose(model.decode(ids, hidden, mask), before)


# ----------------------------------------------------------------------------- views


def test_two_views_are_concatenated_along_the_token_axis():
    model = tiny().eval()
    g = torch.Generator().manual_seed(0)
    pa, lateral = torch.randn(2, 1, 64, 64, generator=g), torch.randn(2, 1, 64, 64, generator=g)
    study = torch.stack([pa, lateral], dim=1)  # [B, 2, 1, R, R]
    with torch.no_grad():
        one, _ = model.encode(pa)
        two, mask = model.encode(study)
        assert mask is None and two.shape[1] == 2 * one.shape[1]  # the token count doubles
        # the encoder's input: the PA's patch features, then the lateral's
        feats = model.att_embed(torch.cat([model.encoder(pa), model.encoder(lateral)], dim=1))
        x = feats
        for layer in model.encoder_layers:
            x = layer(x, None)
        torch.testing.assert_close(two, model.encoder_norm(x))
        # report_generator's way, on request: the views averaged, one view's token count
        model.views = "mean"
        assert model.encode(study)[0].shape == one.shape


def test_a_padded_view_is_masked_out_of_the_concatenation():
    model = tiny().eval()
    g = torch.Generator().manual_seed(1)
    study = torch.randn(2, 2, 1, 64, 64, generator=g)
    mask = torch.tensor([[True, True], [True, False]])
    changed = study.clone()
    changed[1, 1] = torch.randn(1, 64, 64, generator=g) * 5  # the padded view's pixels
    tok = model.tokenizer
    ids = [tok.encode("the heart is enlarged ."), tok.encode("no effusion .")]
    with torch.no_grad():
        hidden, token_mask = model.encode(study, mask)
        n = hidden.shape[1] // 2
        assert token_mask is not None
        assert token_mask.tolist() == [[True] * 2 * n, [True] * n + [False] * n]
        torch.testing.assert_close(model(changed, ids, mask), model(study, ids, mask))
        assert not torch.allclose(model(changed, ids), model(study, ids))
        settings = dict(num_beams=2, max_new_tokens=6)
        assert model.generate(changed, view_mask=mask, **settings) == model.generate(
            study, view_mask=mask, **settings
        )


# ----------------------------------------------------------------------------- decoding


def test_greedy_is_the_argmax_path_and_decoding_settings_apply():
    model = tiny().eval()
    tok = model.tokenizer
    images = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    steps = 8
    with torch.no_grad():
        hidden, mask = model.encode(images)
        ids = torch.full((3, 1), tok.bos_id)
        for _ in range(steps):  # stop rule aside, greedy = the argmax at every step
            logits = model.decode(ids, hidden, mask)[:, -1]
            logits[:, [tok.bos_id, tok.pad_id]] = -torch.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    want = []
    for row in ids[:, 1:].tolist():
        want.append(tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row))
    assert model.generate(images, num_beams=1, max_new_tokens=steps) == want

    # min_new_tokens holds EOS back; the repetition rules are Hugging Face's processors
    long = model.generate(images, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    assert all(len(r.split()) == 6 for r in long)
    no_repeat = model.generate(images, num_beams=1, max_new_tokens=12, no_repeat_ngram_size=1)
    assert all(len(set(r.split())) == len(r.split()) for r in no_repeat)


def test_beam_search_with_a_beam_per_prefix_finds_the_best_report():
    """A 7-word vocabulary and V^2 beams: three steps of search are exhaustive, so the
    result must be the best of every report of up to three words (ended by EOS or not)."""
    import itertools

    from raydiology.data.tokenizers import TokenizerConfig, train_tokenizer

    texts = ["heart is normal .", "lungs clear .", "small effusion ."]
    tok = train_tokenizer(TokenizerConfig(kind="word", min_freq=1), texts)
    cfg = from_dict(R2GenConfig, {"flavor": "tiny"}, "model")
    torch.manual_seed(3)
    model = build_r2gen(cfg, image_size=64, in_chans=1, tokenizer=tok).eval()
    image = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    words = [i for i in range(tok.vocab_size) if i not in (tok.bos_id, tok.pad_id, tok.eos_id)]
    hypotheses = [[tok.eos_id]]  # every report of up to 3 words; shorter ones end with EOS
    for n in (1, 2, 3):
        ends = [[tok.eos_id]] if n < 3 else [[]]
        hypotheses += [[*w, *e] for w in itertools.product(words, repeat=n) for e in ends]
    with torch.no_grad():
        hidden, mask = model.encode(image)
        scores = []
        for seq in hypotheses:  # teacher-forced log-probability of each hypothesis
            ids = torch.tensor([[tok.bos_id, *seq]])
            logp = model.decode(ids[:, :-1], hidden, mask)[0].log_softmax(-1)
            scores.append(logp.gather(1, ids[0, 1:, None]).sum().item())

    def best(allowed: list[int]) -> list[str]:
        return [tok.decode(hypotheses[max(allowed, key=scores.__getitem__)])]

    beams = len(words) ** 2 + 3
    everything = list(range(len(hypotheses)))
    assert model.generate(image, num_beams=beams, max_new_tokens=3) == best(everything)
    # EOS held back for three tokens: the best three-word report (the beams' order matters)
    three = [i for i, h in enumerate(hypotheses) if len(h) == 3 and tok.eos_id not in h]
    settings = {"num_beams": beams, "max_new_tokens": 3, "min_new_tokens": 3}
    assert model.generate(image, **settings) == best(three)


# ----------------------------------------------------------------------------- training


def _phantom_studies(n: int, size: int = 64) -> dict:
    from raydiology.data.phantom import make_phantom

    images, reports = [], []
    for i in range(n):
        views = [make_phantom(np.random.default_rng([7, i]), size=size, finding_prob=0.5,
                              view=view) for view in ("PA", "LATERAL")]  # fmt: skip
        images.append(np.stack([v.image for v in views])[:, None])
        reports.append(views[0].report)
    pixels = torch.from_numpy(np.stack(images)).float()
    return {"image": (pixels / pixels.amax() - 0.5) / 0.5, "report": reports,
            "view_mask": torch.ones(n, 2, dtype=torch.bool)}  # fmt: skip


def test_report_sft_trains_r2gen_on_two_view_phantoms_and_generates_from_its_export(tmp_path):
    from raydiology.evaluation.generate import generate_reports
    from raydiology.train.export import export_encoder

    exp = load_experiment(
        EXPERIMENT,
        profile="r2gen_smoke",
        overrides=["model.flavor=tiny", "data.resolution=64", "data.phantom.size=64"],
    )
    assert exp.model.name == "r2gen" and exp.data.study_views == 2
    torch.manual_seed(0)
    model = build_r2gen(exp.model.config, image_size=64, in_chans=3)
    objective = build_report_sft(exp.objective.config, model=model)
    batch = _phantom_studies(4)
    batch["image"] = batch["image"].expand(-1, -1, 3, -1, -1)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = objective(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())

    # the export round trip that `raydiology eval` uses: one report per two-view study
    from raydiology.data.phantom import write_phantom_corpus

    run = tmp_path / "run"
    export_encoder(objective, run / "export", exp=exp, corpus_sha256=None, step=0)
    objective.export_extra(run / "export", write=True, gather=False)
    save_resolved(exp, run / "config.yaml")
    write_phantom_corpus(tmp_path / "c", n=3, size=64, views=2, progress=False)
    quick = {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 1, "batch_size": 2}
    rows = generate_reports(run, tmp_path / "c", split=None, generation=quick)
    assert [r["id"] for r in rows] == [f"phantom-{i:07d}" for i in range(3)]
    model.eval()
    from raydiology.evaluation.generate import load_generator

    loaded, _ = load_generator(run)
    assert isinstance(loaded.model, R2Gen)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], p)


@pytest.mark.ray
def test_smoke_run_under_ray_train_validates_exports_and_generates(ray_cluster, tmp_path):
    """`raydiology run` with the smoke profile: 2 DeepSpeed workers over two-view phantom
    studies, validation at the end, the export read back by generate_reports."""
    import json

    from rich.console import Console

    from raydiology.evaluation.generate import generate_reports
    from raydiology.train.launch import read_metrics, resolve_corpus, run_experiment

    exp = load_experiment(
        EXPERIMENT,
        profile="r2gen_smoke",
        overrides=[
            f"output.dir={tmp_path}",
            "data.resolution=64",
            "data.phantom.size=64",
            "data.phantom.images=48",
            "train.max_steps=12",
            "train.optimizer.lr=3.0e-3",
            "train.checkpoint_every=12",
            "train.eval_every=12",
        ],
    )
    result = run_experiment(exp, console=Console(quiet=True))
    metrics = read_metrics(result.run_dir)
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert losses[-1] < losses[0], losses
    (validated,) = [r for r in metrics if "val_score" in r]
    assert validated["step"] == 12 and validated["val_score"] == validated["val_BLEU_4"]
    spec = json.loads((result.run_dir / "export" / "generator.json").read_text())
    assert spec["parameters"]["trainable"] == spec["parameters"]["total"]
    corpus = resolve_corpus(exp, console=Console(quiet=True))
    quick = {"max_new_tokens": 8, "batch_size": 8}
    rows = generate_reports(result.run_dir, corpus, split="test", generation=quick)
    studies = {r["id"] for r in rows}
    assert len(studies) == len(rows) > 0  # one report per two-view study
    info = json.loads((result.run_dir / "eval" / "run.json").read_text())
    assert (info["encoder"], info["decoder"]) == ("resnet10t", "r2gen/tiny")
