"""EVA-X teachers from the field's checkpoints: open_clip (a plain ViT tower and an EVA02 timm
tower), timm, a Hugging Face CLIPVisionModel folder and MGCA's checkpoint layout. Each is
built by its own library with random weights and tiny sizes, written to local files, read
back through `model.teacher`, and must give the library's own patch tokens."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from raydiology.config_base import ConfigError, from_dict
from raydiology.models.eva import EvaX, EvaXConfig, build_evax
from raydiology.models.teachers import MGCA_PREFIX, hf_clip_post_layernorm

EVA_X_MEAN, EVA_X_STD = [0.49185243] * 3, [0.28509309] * 3


def _model(teacher: dict, *, image_size: int = 64, in_chans: int = 3) -> EvaX:
    config = from_dict(EvaXConfig, {"flavor": "tiny", "teacher": teacher}, "model")
    return build_evax(config, image_size=image_size, in_chans=in_chans)


def _images(size: int, c: int = 3) -> torch.Tensor:
    return torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(0))


def _same_tokens(model: EvaX, reference: torch.Tensor, size: int) -> None:
    with torch.no_grad():
        tokens = model.teacher.encoder(_images(size))
    assert tokens.shape == reference.shape
    assert torch.allclose(tokens, reference, atol=1e-5)


# ---------------------------------------------------------------------------------- MGCA


def _mgca_vit() -> VisionTransformer:
    """MGCA's ViT layout (timm names, qkv bias, eps 1e-6) at a tiny size: 128 px, 2 blocks."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=128, patch_size=16, embed_dim=128, depth=2, num_heads=2, num_classes=0
    )
    return vit.eval()


def _mgca_checkpoint(vit: VisionTransformer, folder: Path) -> Path:
    """A Lightning-style MGCA checkpoint: the ViT under `img_encoder_q.model.`, beside the
    text encoder and projection heads the teacher must ignore."""
    state = {MGCA_PREFIX + k: v for k, v in vit.state_dict().items()}
    state["img_encoder_q.global_embed.head.0.weight"] = torch.randn(16, 128)
    state["text_encoder_q.model.embeddings.word_embeddings.weight"] = torch.randn(30, 8)
    state["prototype_layer.weight"] = torch.randn(10, 16)
    path = folder / "mgca.ckpt"
    torch.save({"epoch": 20, "global_step": 33137, "state_dict": state}, path)
    return path


def test_mgca_checkpoint_teaches_with_its_own_input(tmp_path) -> None:
    """The loaded ViT gives timm's tokens for MGCA's layout; the student's 64-px 1-channel
    images (EVA-X normalisation) reach it as 128-px RGB normalised 0.5/0.5, and its 8x8 grid
    is interpolated to the student's 4x4."""
    vit = _mgca_vit()
    path = _mgca_checkpoint(vit, tmp_path)
    model = _model(
        {
            "format": "mgca",
            "path": str(path),
            "input_mean": [0.49185243],
            "input_std": [0.28509309],
        },
        in_chans=1,
    )
    teacher = model.teacher
    assert (teacher.image_size, teacher.in_chans, teacher.grid, teacher.embed_dim) == (
        128,
        3,
        8,
        128,
    )
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        _same_tokens(model, vit.forward_features(_images(128))[:, 1:], 128)
        x = _images(64, c=1)
        pixels = x * 0.28509309 + 0.49185243
        rgb = ((pixels - 0.5) / 0.5).expand(-1, 3, -1, -1)
        big = F.interpolate(rgb, size=(128, 128), mode="bilinear", antialias=True)
        fmap = vit.forward_features(big)[:, 1:].transpose(1, 2).reshape(2, 128, 8, 8)
        expected = F.interpolate(fmap, size=(4, 4), mode="bilinear").flatten(2).transpose(1, 2)
        assert torch.allclose(model.forward_targets(x), expected, atol=1e-5)


def test_mgca_stripped_state_dict_loads_and_pickled_objects_are_refused(tmp_path) -> None:
    vit = _mgca_vit()
    save_file(vit.state_dict(), tmp_path / "mgca_vit.safetensors")
    model = _model({"format": "mgca", "path": str(tmp_path / "mgca_vit.safetensors")})
    _same_tokens(model, vit.forward_features(_images(128))[:, 1:], 128)
    # DDP-prefixed names inside a training script's {"model": ...} wrapper read the same.
    wrapped = {"model": {f"module.{k}": v for k, v in vit.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ddp.pth")
    model = _model({"format": "mgca", "path": str(tmp_path / "ddp.pth")})
    _same_tokens(model, vit.forward_features(_images(128))[:, 1:], 128)

    # Lightning keeps hyper-parameters beside the weights; a pickled object among them is
    # never unpickled (weights_only=True), the file is refused with a way out.
    torch.save(
        {"state_dict": vit.state_dict(), "hparams": argparse.Namespace(lr=1.0)},
        tmp_path / "objects.ckpt",
    )
    with pytest.raises(ValueError, match="weights_only"):
        _model({"format": "mgca", "path": str(tmp_path / "objects.ckpt")})
    # Weights of another layout: refused, naming the key.
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError) as err:
        _model({"format": "mgca", "path": str(tmp_path / "other.safetensors")})
    assert err.value.key == "model.teacher.path"


# ---------------------------------------------------------------------------------- timm


def test_timm_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False).eval()  # with its classifier
    save_file(reference.state_dict(), tmp_path / "test_vit.safetensors")
    model = _model(
        {
            "format": "timm",
            "model": "test_vit",
            "path": str(tmp_path / "test_vit.safetensors"),
            "input_mean": EVA_X_MEAN,
            "input_std": EVA_X_STD,
        }
    )
    teacher = model.teacher
    size = reference.patch_embed.img_size[0]
    assert (teacher.image_size, teacher.grid, teacher.embed_dim) == (
        size,
        size // 16,
        reference.num_features,
    )
    assert teacher.teacher_mean is not None
    assert teacher.teacher_mean.flatten().tolist() == pytest.approx(
        reference.pretrained_cfg["mean"]
    )
    with torch.no_grad():
        expected = reference.forward_features(_images(size))[:, reference.num_prefix_tokens :]
    _same_tokens(model, expected, size)

    # A checkpoint of another model misses weights: refused before training.
    save_file({"cls_token": torch.zeros(1, 1, 64)}, tmp_path / "partial.safetensors")
    with pytest.raises(ConfigError, match="missing"):
        _model(
            {"format": "timm", "model": "test_vit", "path": str(tmp_path / "partial.safetensors")}
        )


# ----------------------------------------------------------------------------- open_clip

OPEN_CLIP_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
OPEN_CLIP_CONFIGS = {
    # open_clip's own VisionTransformer (OpenAI-CLIP style)
    "rd-tiny-vit": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # EVA02-CLIP's layout: a timm EVA02 trunk inside open_clip, as EVA02-B-16's config
    "rd-tiny-eva02": {
        "image_size": 224,
        "timm_model_name": "eva02_tiny_patch14_224",
        "timm_model_pretrained": False,
        "timm_pool": "token",
        "timm_proj": None,
    },
}


@pytest.mark.parametrize("name", list(OPEN_CLIP_CONFIGS))
def test_open_clip_checkpoint(tmp_path, name: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 32, "vision_cfg": OPEN_CLIP_CONFIGS[name], "text_cfg": OPEN_CLIP_TEXT}
    config["custom_text"] = "timm_model_name" in config["vision_cfg"]
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    torch.save(reference.state_dict(), tmp_path / "clip.pt")  # the whole CLIP, as released

    model = _model({"format": "open_clip", "model": name, "path": str(tmp_path / "clip.pt")})
    teacher = model.teacher
    size = OPEN_CLIP_CONFIGS[name]["image_size"]
    assert teacher.image_size == size and teacher.teacher_mean is None  # no input_mean given
    assert teacher.encoder.training is False
    x = _images(size)
    with torch.no_grad():
        visual = reference.visual
        if hasattr(visual, "trunk"):
            expected = visual.trunk.forward_features(x)[:, visual.trunk.num_prefix_tokens :]
        else:
            visual.output_tokens = True
            expected = visual(x)[1]
    assert teacher.grid**2 == expected.shape[1]
    _same_tokens(model, expected, size)


# ------------------------------------------------------------------------ Hugging Face CLIP


def test_hf_clip_vision_folder(tmp_path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    reference = CLIPVisionModel(config).eval()
    reference.save_pretrained(tmp_path / "clip")
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    model = _model(
        {
            "format": "hf_clip",
            "path": str(tmp_path / "clip"),
            "input_mean": EVA_X_MEAN,
            "input_std": EVA_X_STD,
        }
    )
    teacher = model.teacher
    assert (teacher.image_size, teacher.grid, teacher.embed_dim) == (32, 4, 32)
    assert (
        teacher.teacher_std is not None
        and teacher.teacher_std.flatten().tolist() == pytest.approx(std)
    )
    with torch.no_grad():
        hidden = reference(pixel_values=_images(32)).last_hidden_state
        expected = hf_clip_post_layernorm(reference)(hidden)[:, 1:]
    _same_tokens(model, expected, 32)


# -------------------------------------------------------------------------------- config


def test_teacher_formats_are_checked_before_loading(tmp_path) -> None:
    cases = [
        ({"format": "open_clip", "path": "x.pt"}, "model.teacher.model"),
        ({"format": "mgca", "model": "vit_base", "path": "x.pt"}, "model.teacher.model"),
        ({"format": "timm", "model": "test_vit"}, "model.teacher.path"),
        ({"format": "tokenizer", "path": "x.pt"}, "model.teacher.format"),
    ]
    for teacher, key in cases:
        with pytest.raises(ConfigError) as err:
            from_dict(EvaXConfig, {"teacher": teacher}, "model")
        assert err.value.key == key, teacher
    with pytest.raises(ConfigError) as err:
        _model({"format": "mgca", "path": str(tmp_path / "nowhere.ckpt")})
    assert err.value.key == "model.teacher.path"


def test_student_rebuilt_on_meta_does_not_read_an_external_teacher(tmp_path) -> None:
    """`load_encoder` rebuilds a student on the meta device: its teacher's checkpoint is not
    read (nor needed), a stand-in takes its place and the mfm objective would refuse it."""
    with torch.device("meta"):
        model = _model({"format": "mgca", "path": str(tmp_path / "elsewhere.ckpt")})
    assert model.teacher.placeholder and model.teacher.loaded_from.endswith("elsewhere.ckpt")
