"""Trained vs random-initialised encoders on the phantom dense evaluations (issue 17).

Not collected by pytest (no `test_` prefix): it prints the figures that tests/test_segment.py
and tests/test_detect.py quote. A trained export is passed in (the README's first command,
`raydiology run experiments/hd_mae_cam.yaml --profile quickstart`, writes one to
`runs/hd_mae_cam/export`); the random encoders are step-0 exports of the same experiment and
profile, one per seed, so trained and random differ only in the weights.

    PYTHONPATH=platform OMP_NUM_THREADS=1 python tests/margin_figures.py \
        trained=runs/hd_mae_cam/export --profile quickstart --work /tmp/margin

Each seed s pairs the trained export and random export s + 1, both with decoder seed s.
Segmentation: linear decoder (BatchNorm + 1x1 conv) on the last layer, and UPerNet, no
augmentation (features computed once), Adam lr 1e-3, `--seg-steps` steps; detection: the
DETR-style decoder at lr 1e-3 (DETR's 1e-4 does not fit even ideal features in 1500 steps:
tests/test_detect.py), `--det-steps` steps. Every value here is a CLI option of `raydiology
evaluate segment|detect`.

`--pose 5 --lesion-scale 3` evaluates on phantoms whose anatomy moves, shrinks and tilts
(no location shortcut) with lesions of 10-20 px; `--seg-train N` keeps N training images.

`--baselines` adds two feature-free rows per seed: "position", a one-hot of the patch's place
in the grid, the same for every image (segmentation; what a decoder gets from location alone),
and "pixels", each patch's raw pixels (detection; the patch grid's own limit).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
MASKS = ["mask_lungs", "mask_heart", "mask_clavicles", "mask_lesion"]
CLASSES = ["lungs", "heart", "clavicles", "lesion"]


def random_export(experiment: str, profile: str, folder: Path, seed: int) -> Path:
    from raydiology.config import load_experiment
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder

    if not (folder / "encoder.json").is_file():
        exp = load_experiment(REPO / "experiments" / experiment, profile=profile)
        torch.manual_seed(seed)
        objective = build_objective(exp.objective, build_model(exp.model, exp.data))
        export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    return folder


def phantoms(folder: Path, n: int, size: int, **kind: float) -> Path:
    from raydiology.data.phantom import write_phantom_corpus

    if not (folder / "manifest.json").is_file():
        write_phantom_corpus(folder, n=n, size=size, finding_prob=0.6, progress=False, **kind)  # type: ignore[arg-type]
    return folder


class PositionOnly(nn.Module):
    """Stands in for a dense encoder: a one-hot of each patch's grid place, the same for every
    image, so a decoder can learn only where the classes usually are."""

    def __init__(self, like: nn.Module) -> None:
        super().__init__()
        self.data, self.grid = like.data, like.grid  # the real encoder's input handling
        self.embed_dim = self.grid[0] * self.grid[1]
        self.layer_ids, self.layer_dims, self.pyramid = [0] * 4, [self.embed_dim] * 4, False

    def forward(self, x: Tensor) -> dict[str, object]:
        gh, gw = self.grid
        onehot = torch.eye(gh * gw).reshape(1, gh * gw, gh, gw).expand(len(x), -1, -1, -1)
        return {"last": onehot, "layers": [onehot] * 4}


def pixel_patches(encoder: object, images: Tensor, **_: object) -> Tensor:
    """Stands in for `detect.encode_split`: each 16-px patch's pixels, standardised."""
    x = images.float()
    x = (x - x.mean()) / x.std()
    side = images.shape[-1] // 16
    return F.unfold(x, 16, stride=16).reshape(len(x), 256, side, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trained", help="NAME=EXPORT of the trained encoder")
    parser.add_argument("--experiment", default="hd_mae_cam.yaml")
    parser.add_argument("--profile", default="quickstart")
    parser.add_argument("--work", type=Path, default=Path("/tmp/margin"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seg-images", type=int, default=160)
    parser.add_argument("--det-images", type=int, default=600)
    parser.add_argument("--seg-steps", type=int, default=2000)
    parser.add_argument("--seg-train", type=int, default=0, help="train on N images (0: all)")
    parser.add_argument("--det-steps", type=int, default=1000)
    parser.add_argument("--tasks", default="linear,detect")
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--pose", type=float, default=1.0, help="phantoms' pose spread")
    parser.add_argument("--lesion-scale", type=float, default=1.0, help="phantoms' nodule size")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from raydiology.evaluation.dense import dense_splits, load_dense_encoder
    from raydiology.evaluation.detect import DetectConfig, box_splits, detect_encoder
    from raydiology.evaluation.segment import SegmentConfig, segment_encoder

    name, trained = args.trained.split("=", 1)
    res = args.resolution
    tasks = args.tasks.split(",")
    look = {"pose": args.pose, "lesion_scale": args.lesion_scale}
    seg_corpus = phantoms(args.work / "seg", args.seg_images, res, masks=True, **look)
    seg = dense_splits(seg_corpus, MASKS, res)
    if args.seg_train:  # label-scarce: the first N training images only
        t = seg["train"]
        seg["train"] = type(t)(images=t.images[: args.seg_train], masks=t.masks[: args.seg_train],
                               known=t.known[: args.seg_train],
                               image_ids=t.image_ids[: args.seg_train])  # fmt: skip
    det, det_classes = box_splits(
        phantoms(args.work / "det", args.det_images, res, boxes=True, **look), res
    )
    print("segmentation images", {k: len(v) for k, v in seg.items()})
    print("detection images", {k: len(v) for k, v in det.items()},
          "test boxes", sum(len(b) for b in det["test"].boxes))  # fmt: skip
    figures: dict[tuple[str, str], list[float]] = {}

    def baseline(task: str, like: nn.Module, seed: int) -> None:
        import raydiology.evaluation.detect as detect

        if task in ("linear", "uper"):
            cfg = SegmentConfig(decoder=task, augment=False, lr=1e-3, eval_every=100,  # type: ignore[arg-type]
                                max_steps=args.seg_steps, patience=5, seed=seed)  # fmt: skip
            row, _ = segment_encoder(PositionOnly(like), seg, CLASSES, cfg, name="position")  # type: ignore[arg-type]
            who, value = "position", row["dice_mean"]
        else:
            encode, detect.encode_split = detect.encode_split, pixel_patches  # type: ignore[assignment]
            try:
                dcfg = DetectConfig(lr=1e-3, max_steps=args.det_steps, eval_every=100,
                                    patience=5, seed=seed)  # fmt: skip
                patches = SimpleNamespace(embed_dim=256, grid=like.grid)  # what the head reads
                row, _, _ = detect_encoder(patches, det, det_classes, dcfg, name="pixels")  # type: ignore[arg-type]
            finally:
                detect.encode_split = encode
            who, value = "pixels", row["map50"] or 0.0
        figures.setdefault((task, who), []).append(value)
        print(f"seed {seed} {task:6s} {who:8s} {value:.3f}", flush=True)

    for seed in range(args.seeds):
        folder = args.work / f"random{seed + 1}"
        pair = {name: trained, "random": random_export(args.experiment, args.profile, folder,
                                                       seed + 1)}  # fmt: skip
        for who, path in pair.items():
            encoder = load_dense_encoder(path)
            for task in tasks:
                if who == "random" and args.baselines:
                    baseline(task, encoder, seed)
                start = time.perf_counter()
                if task in ("linear", "uper"):
                    cfg = SegmentConfig(decoder=task, augment=False, lr=1e-3, eval_every=100,  # type: ignore[arg-type]
                                        max_steps=args.seg_steps, patience=5, seed=seed)  # fmt: skip
                    row, _ = segment_encoder(encoder, seg, CLASSES, cfg, name=who)
                    value, detail = row["dice_mean"], row["dice"]
                else:
                    dcfg = DetectConfig(lr=1e-3, max_steps=args.det_steps, eval_every=100,
                                        patience=5, seed=seed)  # fmt: skip
                    row, _, _ = detect_encoder(encoder, det, det_classes, dcfg, name=who)
                    value, detail = row["map50"] or 0.0, {"mean_iou": row["mean_iou"]}
                    figures.setdefault(("detect mean IoU", who), []).append(row["mean_iou"])
                figures.setdefault((task, who), []).append(value)
                took = time.perf_counter() - start
                print(
                    f"seed {seed} {task:6s} {who:8s} {value:.3f} {detail} {took:.0f}s", flush=True
                )
    print("\n| task | encoder | " + " | ".join(f"seed {s}" for s in range(args.seeds))
          + " | median |")  # fmt: skip
    print("|---|---|" + "---|" * (args.seeds + 1))
    for (task, who), values in figures.items():
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(f"| {task} | {who} | {cells} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
