"""The parameters of the analysis notebooks (01, 02, 04, 05, 06, 07), typed and checked like TrainParams.

Each notebook's first cell after its parameters cell reads them with `<Class>.from_namespace(globals())`:
every value is converted to its declared type and checked (range, choices) by the same field checker as
the training parameters, so `-p n_boot -5` or `-p split train` is one line naming the parameter before
anything is read or written; and a name papermill injected that the notebook does not have (a typo such
as `-p n_bot 50`) is refused instead of being ignored. 03_train reads TrainParams (train/params.py); a
test holds every notebook's parameters cell to its class (names and defaults).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from tongue_nb.analysis.runs import SPLITS
from tongue_nb.data.synth import MAX_SIZE
from tongue_nb.train.params import (ParamError, check_fields, check_notebook_names, coerce_fields,
                                    injected_parameter_names, param)

__all__ = ["DataReviewParams", "ComparisonNotebookParams", "ErrorAnalysisParams", "ReportParams",
           "PredictNotebookParams", "TuneNotebookParams", "NOTEBOOK_PARAMS"]


class NotebookParams:
    """Base of a notebook's parameters: construction converts and checks every field."""

    #: further parameters the notebook has, checked by the class that uses them (02: CompareParams)
    shared: ClassVar[tuple[str, ...]] = ()
    #: text parameters the notebook cannot go without -> what is expected there
    required: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_fields(self)
        for name, expected in self.required.items():
            if not getattr(self, name).strip():
                raise ParamError(f"parameter {name}: expected {expected}")

    @classmethod
    def names(cls) -> list[str]:
        """Every parameter the notebook has: its own fields, then the shared ones."""
        return [f.name for f in fields(cls)] + list(cls.shared)

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> Any:
        """The notebook's parameters from its variables; a papermill-injected name it does not have is refused."""
        check_notebook_names(injected_parameter_names(namespace) or (), cls.names())
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})


@dataclass
class DataReviewParams(NotebookParams):
    """01_data_review."""

    data_dir: str = param("", "dataset folder (labels.csv, images); empty: the built-in synthetic set")
    tasks: str = param("", "task schema YAML; empty: <data_dir>/tasks.yaml")
    image_size: int = param(128, "synthetic image size in px (used when data_dir is empty)", ge=32,
                            le=MAX_SIZE)
    n_synthetic: int = param(300, "number of synthetic images (used when data_dir is empty)", ge=1)
    seed: int = param(0, "seed of the synthetic set, the sample grids and the split", ge=0)
    samples_per_class: int = param(6, "thumbnails per class in the sample grids", ge=1)
    thumb_size: int = param(96, "thumbnail size in px in the grids and the browser", ge=16, le=1024)
    per_page: int = param(12, "images per page in the browser", ge=1)


@dataclass
class ComparisonNotebookParams(NotebookParams):
    """02_model_comparison: its own parameters; the comparison's (`shared`: steps, batch_size, ...) are
    CompareParams fields, checked when the notebook builds it."""

    shared: ClassVar[tuple[str, ...]] = ("data_dir", "tasks", "steps", "warmup_steps", "batch_size", "image_size", "lr",
                                         "seed", "pretrained", "device", "crop", "eval_batches", "infer_steps",
                                         "isolate", "num_threads", "on_problem")

    backbones: str = param("convnext_tiny,swin_tiny,vit_base", "comma-separated names (or a YAML list with -y)")
    synth_n: int = param(120, "images in the synthetic set when data_dir is empty", ge=1)
    out_dir: str = param("comparison", "folder for comparison.csv / comparison.json (and the synthetic set)")
    required: ClassVar[dict[str, str]] = {"out_dir": "a folder"}

    def __post_init__(self) -> None:
        from tongue_nb.paths import check_folder

        if isinstance(self.backbones, (list, tuple)):  # papermill -y 'backbones: [a, b]'
            self.backbones = ",".join(map(str, self.backbones))
        super().__post_init__()
        check_folder(self.out_dir, "out_dir")


@dataclass
class ErrorAnalysisParams(NotebookParams):
    """04_error_analysis."""

    run_dir: str = param("", "run folder written by 03_train (summary.json, predictions.csv, ...)")
    data_dir: str = param("", "dataset folder for the image gallery (empty: the data_dir in the run params.yaml)")
    split: str = param("test", "split to analyse: val or test", choices=SPLITS)
    n_worst: int = param(12, "images in the worst-errors gallery", ge=1)
    calibration_bins: int = param(10, "bins of the reliability diagram", ge=2, le=100)
    required: ClassVar[dict[str, str]] = {"run_dir": "a run folder, e.g. -p run_dir runs/sweep-x/runs/convnext_tiny"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data_dir and not Path(self.data_dir).is_dir():
            raise ParamError(f"notebook parameter data_dir: {self.data_dir} is not a folder; expected the dataset "
                             "folder of the run's photos, or empty for the run's own data_dir")


@dataclass
class ReportParams(NotebookParams):
    """05_report."""

    sweep_dir: str = param("", "sweep folder written by tongue-nb sweep (runs/, failures.json, comparison/)")
    ensemble_k: int = param(3, "average the k runs best on validation as an extra row (0 or 1: no ensemble)", ge=0)
    n_boot: int = param(1000, "bootstrap resamples for the 95% confidence intervals", ge=1)
    seed: int = param(0, "bootstrap seed", ge=0)
    required: ClassVar[dict[str, str]] = {"sweep_dir": "a sweep folder, e.g. -p sweep_dir runs/sweep-20250101"}

    def __post_init__(self) -> None:
        super().__post_init__()
        folder = Path(self.sweep_dir)
        if not ((folder / "sweep.json").is_file() or (folder / "runs").is_dir() or (folder / "cv").is_dir()):
            raise ParamError(f"notebook parameter sweep_dir: {folder} is not a sweep folder (no sweep.json, no runs/); "
                             "expected the folder `tongue-nb sweep --out` wrote (a run folder goes to 04_error_analysis)")


@dataclass
class PredictNotebookParams(NotebookParams):
    """06_predict."""

    runs: str = param("", "trained run folder(s), comma-separated (several: their ensemble); or use selection")
    selection: str = param("", "a sweep's selection.json (per-task choice of run, ensemble or baseline); or use runs")
    images: str = param("", "folder of photos, or a CSV with image (and optional mask, id)")
    segmenter: str = param("", "segmenter run folder for photos without a mask; empty: none")
    out_csv: str = param("", "where to write the predictions; empty: predictions-<images name>.csv in the working "
                             "folder")
    n_gallery: int = param(12, "photos shown in the gallery (0: none)", ge=0)
    explain: bool = param(True, "class-activation overlays for the first gallery photos (one network run only)")

    required: ClassVar[dict[str, str]] = {"images": "a folder of photos or a CSV with an image column"}

    def __post_init__(self) -> None:
        from tongue_nb.paths import check_file_target

        super().__post_init__()
        if bool(self.run_list) == bool(self.selection.strip()):
            raise ParamError("parameters runs and selection: expected trained run folders (runs) or a sweep's "
                             "selection file (selection), one of the two")
        check_file_target(self.output, "out_csv")

    @property
    def run_list(self) -> list[str]:
        return [r.strip() for r in self.runs.split(",") if r.strip()]

    @property
    def output(self) -> Path:
        """out_csv, or predictions-<photos folder or CSV name>.csv in the working folder (never a run folder)."""
        return Path(self.out_csv) if self.out_csv.strip() else Path(f"predictions-{Path(self.images).stem or 'photos'}.csv")


@dataclass
class TuneNotebookParams(NotebookParams):
    """07_tune."""

    tune_dir: str = param("", "tune folder written by tongue-nb tune (tune.json, trials/, study.db, best.yaml)")
    required: ClassVar[dict[str, str]] = {"tune_dir": "a tune folder, e.g. -p tune_dir tune/lr-crop"}


#: notebook file stem -> its parameters class (03_train: TrainParams)
NOTEBOOK_PARAMS: dict[str, type] = {"01_data_review": DataReviewParams, "02_model_comparison": ComparisonNotebookParams,
                                    "04_error_analysis": ErrorAnalysisParams, "05_report": ReportParams,
                                    "06_predict": PredictNotebookParams, "07_tune": TuneNotebookParams}
