"""Tongue segmentation on tiny synthetic photos: a real U-Net run folder, masks for photos that have none."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tongue_nb.model import segment
from tongue_nb.pipeline.cli import main as cli_main
from tongue_nb.train.params import ParamError
from tongue_nb.data.synth import make_synthetic


def test_clean_mask_keeps_the_largest_region_and_fills_its_holes():
    prob = np.zeros((40, 40))
    prob[5:30, 5:30] = 0.9
    prob[12:16, 12:16] = 0.1  # a hole inside the tongue
    prob[34:37, 34:37] = 0.8  # a speck elsewhere
    mask = segment.clean_mask(prob)
    assert mask[14, 14] and not mask[35, 35] and mask.sum() == 25 * 25
    assert segment.clean_mask(np.zeros((40, 40))) is None  # nothing found: None, never an empty crop
    tiny = np.zeros((100, 100))
    tiny[0, 0] = 1.0
    assert segment.clean_mask(tiny) is None  # a few pixels are no tongue either
    assert segment.iou_dice(mask, mask) == (1.0, 1.0)
    half = mask.copy()
    half[:, :17] = False
    iou, dice = segment.iou_dice(half, mask)
    assert 0 < iou < dice < 1


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seg")
    data = make_synthetic(root / "data", n=40, size=64, seed=3)
    out = root / "seg"
    code = cli_main(["train-segmenter", "--data", str(data), "--out", str(out), "--set", "image_size=64",
                     "--set", "epochs=5", "--set", "lr=3e-3", "--set", "batch_size=8", "--set", "num_threads=1"])
    assert code == 0
    return {"data": data, "out": out}


def test_segmenter_run_folder_and_scores(seg_run):
    out = seg_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "segmenter" and summary["pretrained"]["kind"] == "package"
    assert set(summary["test"]) == {"iou", "dice", "iou_clean", "dice_clean"}
    assert all(0.0 <= v <= 1.0 for v in summary["test"].values())
    assert summary["counts"]["train"] > 0 and summary["counts"]["test"] > 0
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5] and history["train_loss"].notna().all()
    assert (out / "checkpoints" / "best.safetensors").is_file() and (out / "checkpoints" / "last.pt").is_file()
    page = (out / "report.html").read_text()  # its own HTML report: scores, curves, overlays
    assert "<title>segmenter - seg</title>" in page and "IoU (post-processed)" in page
    assert page.count("data:image/png;base64") == 2
    # a second run into the same folder is refused; --resume of a finished run retrains nothing
    assert cli_main(["train-segmenter", "--data", str(seg_run["data"]), "--out", str(out), "--set", "image_size=64",
                     "--set", "epochs=5", "--set", "lr=3e-3", "--set", "batch_size=8"]) == 2
    assert cli_main(["train-segmenter", "--data", str(seg_run["data"]), "--out", str(out), "--resume",
                     "--set", "image_size=64", "--set", "epochs=5", "--set", "lr=3e-3", "--set", "batch_size=8",
                     "--set", "num_threads=1"]) == 0
    assert len(pd.read_csv(out / "history.csv")) == 5


def test_segmenter_masks_photos_given_without_one(seg_run, tmp_path):
    from tongue_nb.data.images import read_image, read_mask

    seg = segment.Segmenter.from_run(seg_run["out"])
    labels = pd.read_csv(seg_run["data"] / "labels.csv", dtype=str, keep_default_na=False).head(6)
    photos = [read_image(seg_run["data"] / p) for p in labels["image"]]
    masks = seg.predict(photos)
    assert len(masks) == 6
    for m, img in zip(masks, photos):
        assert m is None or (m.shape == img.shape[:2] and m.dtype == bool and m.any())
    # the masks agree with the drawn ones far better than the whole photo would (IoU ~0.19: the tongue's share)
    truth = [read_mask(seg_run["data"] / p, img.shape[:2]) for p, img in zip(labels["mask"], photos)]
    ious = [segment.iou_dice(m, t)[0] for m, t in zip(masks, truth) if m is not None]
    assert ious and np.mean(ious) > 0.5


def test_predict_uses_the_segmenter_for_photos_without_masks(seg_run, tmp_path):
    from tongue_nb.train.params import load_params
    from tongue_nb.train.trainer import train

    run = tmp_path / "clf"
    train(load_params(backbone="test_convnext", data_dir=str(seg_run["data"]), out_dir=str(run), image_size=32,
                      pretrained=False, batch_size=8, stage1_epochs=0, stage2_epochs=1, max_steps_per_epoch=2,
                      warmup_epochs=0.0, progress=False, num_threads=1, device="cpu", crop="crop_blank"))
    folder = tmp_path / "new"
    folder.mkdir()
    for p in sorted((seg_run["data"] / "images").iterdir())[:3]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "p.csv"
    code = cli_main(["predict", "--run", str(run), "--images", str(folder), "--out", str(out),
                     "--segmenter", str(seg_run["out"])])
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert set(table["mask_source"]) == {"predicted"}
    ok = table["error"] == ""
    assert (code == 0) == ok.all()
    assert all("no tongue found" in e for e in table.loc[~ok, "error"])
    # a classification run is not a segmenter
    assert cli_main(["predict", "--run", str(run), "--images", str(folder), "--out", str(out),
                     "--segmenter", str(run)]) == 2


def test_bad_segmenter_input_is_refused(tmp_path):
    with pytest.raises(ParamError, match="epochs"):
        segment.SegParams(data_dir="d", out_dir="o", epochs=0)
    with pytest.raises(ParamError, match="lr"):
        segment.SegParams(data_dir="d", out_dir="o", lr=float("inf"))
    with pytest.raises(ParamError, match="data_dir and out_dir"):
        segment.SegParams(data_dir="", out_dir="o")
    with pytest.raises(ParamError, match="image_size"):  # an image of 100000 px a side took all the memory
        segment.SegParams(data_dir="d", out_dir="o", image_size=100_000)
    data = make_synthetic(tmp_path / "d", n=12, size=48, seed=0)
    lab = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False).drop(columns=["mask"])
    lab.to_csv(data / "labels.csv", index=False)
    assert cli_main(["train-segmenter", "--data", str(data), "--out", str(tmp_path / "s")]) == 2
    assert cli_main(["train-segmenter", "--data", str(data), "--out", str(data / "inside")]) == 2
    assert cli_main(["train-segmenter", "--data", str(data), "--out", str(tmp_path / "s"), "--set", "epoch=3"]) == 2
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_a_segmenter_run_with_an_unusable_image_size_is_named(seg_run, tmp_path):
    import shutil

    import yaml

    from tongue_nb.runfiles import RunFileError

    run = Path(shutil.copytree(seg_run["out"], tmp_path / "seg"))
    params = yaml.safe_load((run / "params.yaml").read_text())
    for bad in (200_000, True, "x"):
        (run / "params.yaml").write_text(yaml.safe_dump(dict(params, image_size=bad)))
        with pytest.raises(RunFileError, match=r"params\.yaml: image_size"):
            segment.Segmenter.from_run(run)


def test_mask_acceptance_bench_scores_given_and_predicted_masks(seg_run, tmp_path):
    import sys as _sys

    from tongue_nb.train.params import load_params
    from tongue_nb.train.trainer import train

    run = tmp_path / "clf"
    train(load_params(backbone="test_convnext", data_dir=str(seg_run["data"]), out_dir=str(run), image_size=32,
                      pretrained=False, batch_size=8, stage1_epochs=0, stage2_epochs=1, max_steps_per_epoch=2,
                      warmup_epochs=0.0, progress=False, num_threads=1, device="cpu", crop="crop_blank"))
    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import mask_acceptance

    res = mask_acceptance.main(["--run", str(run), "--segmenter", str(seg_run["out"]), "--threads", "1",
                                "--out", str(tmp_path / "acc.json")])
    split = pd.read_csv(run / "split.csv")
    assert res["photos"] == int((split["split"] == "test").sum()) > 0
    assert 0 <= res["given_masks_combined"] <= 1 and res["difference"] == pytest.approx(
        res["predicted_masks_combined"] - res["given_masks_combined"])
    assert json.loads((tmp_path / "acc.json").read_text())["per_task"].keys() == {"shape", "coat"}


def test_segmenter_onnx_export_matches_pytorch(seg_run, tmp_path):
    import onnxruntime as ort
    import torch

    from tongue_nb.model.export import onnx_metadata

    out = tmp_path / "seg.onnx"
    assert cli_main(["export", "--run", str(seg_run["out"]), "--out", str(out)]) == 0
    meta = onnx_metadata(out)
    assert meta["kind"] == "segmenter" and meta["image_size"] == "64" and meta["threshold"] == "0.5"
    seg = segment.Segmenter.from_run(seg_run["out"])
    x = torch.rand(3, 3, 64, 64)
    x = (x - seg.mean) / seg.std
    got = ort.InferenceSession(str(out)).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = torch.sigmoid(seg.net(x)).numpy()
    assert got.shape == (3, 1, 64, 64) and np.abs(got - ref).max() < 1e-4
