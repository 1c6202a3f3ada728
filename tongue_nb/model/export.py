"""Export a trained run to ONNX, with its preprocessing, tasks and thresholds in the model's metadata.

The graph takes ``image``: float32 [batch, 3, S, S], RGB scaled to 0..1 and normalised with the
metadata's mean and std, prepared like training (crop mode and margin in the metadata), and returns
one probability output per task (softmax for multiclass, sigmoid for binary and multilabel), named
after the task. Metadata keys (all strings, JSON where structured): ``tongue_nb_format``,
``image_size``, ``mean``, ``std``, ``crop``, ``crop_margin``, ``tasks`` ([{name, kind, labels}]),
``thresholds`` ({task: [per label]}), ``backbone``, ``timm_name``, ``run``, ``members`` (networks averaged: 1, or K
for a cross-validated sweep's fold ensemble, whose images are plain 0..1: mean 0, std 1, each member normalising
inside the graph).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from tongue_nb.model.backbones import MultiTaskBackbone

__all__ = ["export_onnx", "export_segmenter_onnx", "onnx_metadata", "FORMAT"]

FORMAT = "tongue_nb-onnx-1"


class _Probabilities(nn.Module):
    """The model's per-task probabilities as a tuple, in schema order (ONNX outputs are positional)."""

    def __init__(self, model: MultiTaskBackbone) -> None:
        super().__init__()
        self.model = model
        self.kinds = [(t.name, t.kind) for t in model.schema]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        logits = self.model(image)
        return tuple(torch.softmax(logits[n], dim=1) if k == "multiclass" else torch.sigmoid(logits[n])
                     for n, k in self.kinds)


def _save(module: nn.Module, size: int, output_names: list[str], meta: dict[str, str], out: str | Path) -> Path:
    """Export `module` (input `image` [batch, 3, size, size], dynamic batch) with its metadata, checked, atomically."""
    import onnx

    from tongue_nb.runio import atomic_write_bytes

    program = torch.onnx.export(module, (torch.zeros(2, 3, size, size),), dynamo=True, input_names=["image"],
                                output_names=output_names, dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                                verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    _check_runs(module, data, size, output_names)
    return atomic_write_bytes(out, data)


def _check_runs(module: nn.Module, data: bytes, size: int, output_names: list[str]) -> None:
    """Run the exported graph in onnxruntime on a fixed batch and compare with PyTorch; a graph a runtime cannot
    load or that answers differently is an error before anything is written (not found later by its user)."""
    import numpy as np
    import onnxruntime as ort

    x = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 3, size, size, generator=x)
    batch[1] = -3.0  # a dark photo (all background), where masked statistics have nothing to average
    with torch.no_grad():
        ref = module(batch)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": batch.numpy()})
    except Exception as exc:  # onnxruntime raises its own error types (NotImplemented, Fail, ...)
        raise RuntimeError(f"export: the exported graph does not run in onnxruntime ({str(exc).splitlines()[0]}); "
                           "nothing was written") from None
    for name, a, b in zip(output_names, got, ref):
        diff = float(np.max(np.abs(a - b.numpy()))) if a.size else 0.0
        if not diff <= 1e-3:
            raise RuntimeError(f"export: output {name!r} of the exported graph differs from PyTorch by {diff:.3g} "
                               "(more than 1e-3); nothing was written")


def export_onnx(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's best checkpoint as an ONNX file (dynamic batch) with its metadata; return the path."""
    from tongue_nb.model.baseline import is_baseline_run
    from tongue_nb.paths import check_file_target
    from tongue_nb.pipeline.predict import Predictor

    check_file_target(out, "out (--out)")
    if is_baseline_run(run_dir):
        raise ValueError(f"--run {run_dir}: the classical baseline (gradient boosting on colour statistics) has no "
                         "network to export to ONNX; tongue-nb predict applies it to new photos")
    pred = Predictor.from_runs([run_dir])  # checks the run folder; one model (a fold ensemble: K), thresholds, crop
    if pred.model is None or pred.baselines:
        raise ValueError(f"--run {run_dir}: holds classical-baseline models (gradient boosting on colour statistics), "
                         "which have no network to export to ONNX; tongue-nb predict applies them to new photos")
    model = pred.model
    size = pred.image_size
    module, output_names = _Probabilities(model).eval(), [t.name for t in model.schema]
    meta = {"tongue_nb_format": FORMAT, "image_size": str(size), "mean": json.dumps(list(pred.mean)),
            "std": json.dumps(list(pred.std)), "crop": pred.crop, "crop_margin": str(pred.margin),
            "tasks": json.dumps([{"name": t.name, "kind": t.kind, "labels": list(t.labels)} for t in model.schema]),
            "thresholds": json.dumps(pred.thresholds), "run": str(Path(run_dir).resolve())}
    # A fold ensemble (one network per fold, averaged) names its members' backbone.
    first = model if isinstance(model, MultiTaskBackbone) else model.members[0]
    meta.update(backbone=first.backbone_name, timm_name=first.timm_name, members=str(pred.n_networks))
    return _save(module, size, output_names, meta, out)


class _MaskProbability(nn.Module):
    """A segmenter's tongue probability per pixel, [batch, 1, S, S]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return torch.sigmoid(self.net(image))


def export_segmenter_onnx(run_dir: str | Path, out: str | Path) -> Path:
    """Write a segmenter run (tongue-nb train-segmenter) as ONNX: input `image` [batch, 3, S, S] (the whole photo
    letterboxed to S, 0..1, normalised with mean/std), output `tongue` [batch, 1, S, S] probabilities; metadata
    says so, with the threshold (0.5) and the post-processing (largest region, holes filled) a user applies."""
    from tongue_nb.model.segment import Segmenter
    from tongue_nb.paths import check_file_target

    check_file_target(out, "out (--out)")
    seg = Segmenter.from_run(run_dir)
    size = seg.image_size
    module, output_names = _MaskProbability(seg.net).eval(), ["tongue"]
    meta = {"tongue_nb_format": FORMAT, "kind": "segmenter", "image_size": str(size),
            "mean": json.dumps(seg.mean.flatten().tolist()), "std": json.dumps(seg.std.flatten().tolist()),
            "preprocessing": "whole photo letterboxed (padded to a square, centred) and resized to image_size",
            "threshold": "0.5", "postprocessing": "largest connected region, holes filled; none found: no tongue",
            "run": str(Path(run_dir).resolve())}
    return _save(module, size, output_names, meta, out)


def onnx_metadata(path: str | Path) -> dict[str, object]:
    """An exported file's metadata, JSON values decoded; a missing or damaged file, or one that is not a tongue_nb
    export of this format, is a RunFileError naming it."""
    from tongue_nb.runfiles import RunFileError, read_onnx_metadata

    expected = f"an ONNX model exported by tongue-nb export (metadata tongue_nb_format {FORMAT!r})"
    out: dict[str, object] = {}
    for key, value in read_onnx_metadata(path, expected).items():
        try:
            out[key] = json.loads(value) if key in ("mean", "std", "tasks", "thresholds") else value
        except ValueError:
            out[key] = value
    if out.get("tongue_nb_format") != FORMAT:
        raise RunFileError(path, f"metadata tongue_nb_format is {out.get('tongue_nb_format')!r}", expected)
    return out
