"""The `tongue-nb` command line: thin wrappers over the functions the notebooks call."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from tongue_nb.pipeline.tune import add_tune_command

log = logging.getLogger("tongue_nb")


def _data_arg(data: str | None) -> str | None:
    """--data as given; None when absent. An empty value (an unset shell variable) is refused, never the synthetic set."""
    if data is not None and not data.strip():
        raise ValueError(f"--data: got {data!r}, expected a dataset folder (an unset shell variable?); "
                         "leave --data out to use the built-in synthetic set")
    return data


def _data_or_synthetic(data: str | None) -> str:
    """The dataset folder given, or the built-in synthetic set (made once, cached) when --data is absent."""
    if _data_arg(data) is not None:
        return data
    from tongue_nb.data.synth import ensure_synthetic

    return str(ensure_synthetic())


def _cmd_synth(args: argparse.Namespace) -> int:
    from tongue_nb.data.synth import make_synthetic

    out = make_synthetic(args.out, n=args.n, size=args.size, seed=args.seed, missing=args.missing)
    print(f"synthetic dataset: {out} ({args.n} images, {args.size} px)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from tongue_nb.data.importers import import_tonguexpert

    out = import_tonguexpert(args.db_dir, args.out, labels=args.labels, link=args.link)
    print(f"TonguExpert ({args.labels} labels) imported into {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tongue_nb.train.params import ParamError, load_params, read_params_file, split_overrides
    from tongue_nb.train.trainer import train

    values = {"out_dir": args.out}
    if args.backbone is not None:
        values["backbone"] = args.backbone
    elif not any("backbone" in read_params_file(f) for f in args.file or ()) \
            and not any(key == "backbone" for key, _, _ in split_overrides(args.set or ())):
        raise ParamError("train: no backbone given: pass --backbone NAME, or a recipe (-f) or --set backbone=NAME that "
                         "names one")
    if _data_arg(args.data) is not None:
        values["data_dir"] = args.data
    if args.resume:
        values["resume"] = True
    params = load_params(files=args.file or (), overrides=args.set or (), **values)
    summary = train(params)
    fixed = summary["final_metrics_fixed"]["combined_score"]
    thr = summary["final_metrics_thresholded"]["combined_score"]
    print(f"{params.out_dir}: test combined score {fixed:.4f} (fixed), {thr:.4f} (thresholded)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tongue_nb.pipeline.compare import CompareParams, compare_backbones, recommendations

    params = CompareParams(data_dir=_data_or_synthetic(args.data), steps=args.steps, warmup_steps=args.warmup_steps,
                           batch_size=args.batch_size, image_size=args.image_size, seed=args.seed,
                           pretrained=args.pretrained, device=args.device)
    table = compare_backbones(params, args.backbones, out_dir=args.out)
    with_cols = [c for c in ("backbone", "params_total_m", "val_loss", "train_samples_per_s", "infer_samples_per_s",
                             "peak_memory_mb", "error") if c in table.columns]
    print(table[with_cols].to_string(index=False))
    print(json.dumps(recommendations(table), indent=2))
    failed = "error" in table.columns and table["error"].fillna("").astype(str).str.len().gt(0).any()
    return 1 if failed else 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from tongue_nb.model.baseline import fit_baseline_run
    from tongue_nb.train.params import load_params, read_params_file, split_overrides

    values: dict = {"out_dir": args.out}
    if _data_arg(args.data) is not None:
        values["data_dir"] = args.data
    if args.image_size is not None:
        values["image_size"] = args.image_size
    if args.seed is not None:
        values["seed"] = args.seed
    # The same recipe files and --set values as `train`: the baseline shares the runs' split and task weights.
    params = load_params(files=args.file or (), overrides=args.set or (), **values)
    # Its crop is its own (crop_blank: its features are statistics of the tongue region) unless one is given.
    given = any("crop" in read_params_file(f) for f in args.file or ()) \
        or any(key == "crop" for key, _, _ in split_overrides(args.set or ()))
    summary = fit_baseline_run(params, **({"crop": params.crop} if given else {}))
    print(f"{args.out}: test combined score {summary['final_metrics_fixed']['combined_score']:.4f} (fixed), "
          f"{summary['final_metrics_thresholded']['combined_score']:.4f} (thresholded)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from tongue_nb.paths import check_file_target, check_output_folder
    from tongue_nb.pipeline.predict import Predictor, check_options, list_photos, predict_table
    from tongue_nb.runio import atomic_write_text
    from tongue_nb.train.params import ParamError

    if bool(args.run) == bool(args.selection):
        raise ValueError("predict: give trained runs (--run, repeatable) or a sweep's --selection selection.json, "
                         "one of the two")
    # Everything the command was given is checked before a photo or model is read, and before anything is written.
    if args.threads < 0:
        raise ParamError(f"threads (--threads): got {args.threads}, expected an integer >= 0 (0: torch's default)")
    check_options(args.batch_size, args.workers, args.device)
    check_file_target(args.out, "out (--out)")
    if Path(args.images).is_file() and Path(args.images).resolve() == Path(args.out).resolve():
        raise ParamError(f"out (--out): {args.out} is the --images list itself; the predictions would replace it: "
                         "choose another file")
    if args.explain:
        check_output_folder(args.explain, "explain (--explain)")
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = list_photos(args.images)  # checked before the models load: a bad list costs nothing
    segmenter = None
    if args.segmenter:
        from tongue_nb.model.segment import Segmenter

        segmenter = Segmenter.from_run(args.segmenter)
    if args.selection:
        from tongue_nb.pipeline.predict import predict_selection

        if args.explain:
            raise ValueError("predict: --explain maps one trained run; use --run with it, not --selection")
        table = predict_selection(args.selection, photos, batch_size=args.batch_size, workers=args.workers,
                                  device=args.device, segmenter=segmenter)
    else:
        predictor = Predictor.from_runs(args.run, device=args.device)
        table = predict_table(predictor, photos, batch_size=args.batch_size, workers=args.workers, device=args.device,
                              explain_dir=args.explain, segmenter=segmenter)
    atomic_write_text(args.out, table.to_csv(index=False, float_format="%.6g"))
    failed = int((table["error"] != "").sum())
    print(f"{args.out}: {len(table) - failed} of {len(table)} photos scored"
          + (f"; {failed} could not be used (see the error column)" if failed else ""))
    return 1 if failed else 0


def _cmd_train_segmenter(args: argparse.Namespace) -> int:
    from tongue_nb.train.params import ParamError, split_overrides
    from tongue_nb.model.segment import SegParams, train_segmenter

    values: dict = {"data_dir": args.data, "out_dir": args.out, "resume": args.resume}
    for key, raw, item in split_overrides(args.set or (), "--set"):
        if key in ("data_dir", "out_dir") or (key == "resume" and args.resume):
            raise ParamError(f"--set {item!r}: {key} is given by its own option (--{key.split('_')[0]}); give it once")
        if key not in SegParams.__dataclass_fields__:
            raise ParamError(f"--set {item!r}: unknown segmenter parameter {key!r}; known: "
                             f"{', '.join(SegParams.__dataclass_fields__)}")
        values[key] = raw
    summary = train_segmenter(SegParams(**values))
    test = summary.get("test") or {}
    print(f"{args.out}: test IoU {test.get('iou_clean', float('nan')):.4f}, Dice {test.get('dice_clean', float('nan')):.4f} "
          "(post-processed masks)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tongue_nb.model.export import export_onnx, export_segmenter_onnx
    from tongue_nb.runio import RunFolder

    is_segmenter = RunFolder(args.run).run_kind() == "segmenter"
    if is_segmenter:
        out = export_segmenter_onnx(args.run, args.out)
        print(f"{out}: ONNX export of the segmenter {args.run} (preprocessing and post-processing in its metadata)")
    else:
        out = export_onnx(args.run, args.out)
        print(f"{out}: ONNX export of {args.run} (preprocessing, tasks and thresholds in its metadata)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from tongue_nb.pipeline.sweep import default_backbones, recipe_seeds, run_sweep

    result = run_sweep(_data_arg(args.data), args.backbones or default_backbones(args.file),
                       params_file=args.file, overrides=args.set or (), out_dir=args.out,
                       reports_dir=args.reports, compare=not args.no_compare,
                       seeds=args.seeds if args.seeds is not None else recipe_seeds(args.file),
                       cell_timeout=args.cell_timeout, executor=args.executor, slurm=_slurm_options(args),
                       folds=args.folds, workers=args.workers)
    # run_sweep has logged its outcome (result.describe()); the exit status says whether all runs succeeded.
    return 0 if result.ok else 1


def _slurm_options(args: argparse.Namespace) -> dict | None:
    """The --slurm-* options as SlurmExecutor fields (None when none is given)."""
    opts: dict = {}
    for name in ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time_min", "max_requeues", "cluster",
                 "folder"):
        value = getattr(args, f"slurm_{name}")
        if value is not None:
            opts[name] = value
    extra = {}
    for item in args.slurm_option or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-option {item!r}: expected KEY=VALUE (an sbatch option, e.g. account=lab)")
        extra[key.strip()] = value.strip()
    if extra:
        opts["sbatch"] = extra
    if opts and args.executor != "slurm":
        raise ValueError(f"--slurm-* options given but --executor is {args.executor!r}; add --executor slurm")
    return opts or None


def _cmd_backbones(args: argparse.Namespace) -> int:
    import pandas as pd

    from tongue_nb.model.backbones import describe_backbones

    table = pd.DataFrame(describe_backbones(args.names or None))
    hints = [h for h in table.pop("hint") if h]
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        print(table.to_string(index=False, formatters={"params_m": "{:.1f}".format}))
    print("weights: file = pretrained_path, cache = Hugging Face hub cache, package = an installed weights "
          "package, hub = download when online, none = not to be had here")
    for hint in dict.fromkeys(hints):
        print(f"hint: {hint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="tongue-nb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_models_commands(sub)
    _add_sweep_commands(sub)
    add_tune_command(sub)
    return parser


def _add_data_commands(sub: Any) -> None:
    """Subcommands for datasets and backbones: synth, import-tonguexpert, backbones."""
    p = sub.add_parser("synth", help="write the built-in synthetic tongue dataset")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--missing", type=float, default=0.0, help="fraction of task labels left empty (default 0)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("import-tonguexpert", help="turn the TonguExpert layout into labels.csv + tasks.yaml")
    p.add_argument("db_dir", help="the TonguExpertDatabase folder")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--labels", choices=["manual", "predicted"], default="manual",
                   help="manual (L1, sparse) or predicted (L2, complete) labels")
    p.add_argument("--link", choices=["symlink", "copy"], default="symlink",
                   help="how images enter the dataset folder (default symlink)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("backbones", help="list backbones: timm names, parameters, where pretrained weights come from")
    p.add_argument("names", nargs="*", help="backbones to describe (default: the short names and the "
                                            "architectures with a weights package)")
    p.set_defaults(func=_cmd_backbones)


def _add_training_commands(sub: Any) -> None:
    """Subcommands for one run: train, compare, baseline, train-segmenter."""
    p = sub.add_parser("train", help="train one backbone and write its run folder")
    p.add_argument("--data", help="dataset folder (default: the recipe's data_dir, else the built-in synthetic set)")
    p.add_argument("--backbone", help="short name (see list) or any timm model name (default: the recipe's backbone)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("-f", "--file", action="append", help="parameter YAML file (repeatable; later files win)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="compare backbones on the same short training budget")
    p.add_argument("--data", help="dataset folder (default: the built-in synthetic set)")
    p.add_argument("--backbones", nargs="+", required=True, help="backbone names")
    p.add_argument("--out", help="folder for comparison.csv / comparison.json")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per backbone (default 20)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the timing (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="start from pretrained weights")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("baseline", help="fit the classical colour/texture baseline and write its run folder")
    p.add_argument("--data", help="dataset folder (default: the recipe's data_dir, else the built-in synthetic set)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("-f", "--file", action="append", help="the runs' recipe YAML (repeatable): split, tasks, weights")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    p.add_argument("--image-size", type=int, default=None, help="feature image size (default: the recipe's, else 128)")
    p.add_argument("--seed", type=int, default=None, help="seed (split and boosting; use the trained runs' seed)")
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser("train-segmenter", help="learn tongue masks from a dataset's mask column (U-Net)")
    p.add_argument("--data", required=True, help="dataset folder whose labels.csv has a mask column")
    p.add_argument("--out", required=True, help="segmenter run folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="segmenter parameter (tongue_nb.model.segment.SegParams: encoder, image_size, epochs, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=_cmd_train_segmenter)


def _add_models_commands(sub: Any) -> None:
    """Subcommands for applying trained runs: predict, export."""
    p = sub.add_parser("predict", help="apply trained runs to new photos: probabilities and decisions per task")
    p.add_argument("--run", action="append", metavar="RUN_DIR",
                   help="trained run folder (repeat for the ensemble of several runs)")
    p.add_argument("--selection", metavar="SELECTION_JSON",
                   help="instead of --run: a sweep's selection.json (each task from the run or ensemble chosen for it)")
    p.add_argument("--images", required=True, help="folder of photos, or a CSV with image (and optional mask, id)")
    p.add_argument("--out", required=True, help="output CSV (one row per photo)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="photo-decoding threads (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--explain", metavar="DIR", help="write a class-activation overlay per photo and task (one run)")
    p.add_argument("--segmenter", metavar="SEG_RUN", help="segmenter run that masks photos given without a mask")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a trained run or a segmenter run to ONNX (metadata: preprocessing)")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run folder, or a segmenter run folder")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.set_defaults(func=_cmd_export)


def _add_sweep_commands(sub: Any) -> None:
    """Subcommands for the sweep and where its jobs run."""
    p = sub.add_parser("sweep", help="one training notebook per backbone, then HTML reports")
    p.add_argument("--data", help="dataset folder (default: the recipe's data_dir, else the built-in synthetic set)")
    p.add_argument("-f", "--file", help="recipe YAML applied to every backbone (e.g. params/smoke.yaml)")
    p.add_argument("--backbones", nargs="+", help="backbone names (default: the recipe's list or the seed's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweep-<date>)")
    p.add_argument("--reports", default="reports", help="HTML reports folder (default reports/)")
    p.add_argument("--no-compare", action="store_true", help="skip the model comparison")
    p.add_argument("--cell-timeout", type=float, default=0, metavar="SECONDS",
                   help="a training-notebook cell running longer than this fails its run (a hung run); 0: no limit")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train each backbone once per seed on one shared split (runs <backbone>-seed<k>); "
                        "also the recipe key seeds:")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="cross-validate: set the test split aside, train each backbone and the baseline K times "
                        "(fold k validates; runs <backbone>-fold<k>) and compare their fold ensembles (<sweep>/cv); "
                        "also the recipe key folds:")
    p.add_argument("--executor", choices=("auto", "local", "gpus", "slurm"), default="auto",
                   help="where training notebooks run: auto (one process per GPU when several, else here), local, "
                        "gpus, or slurm (one Slurm job per backbone through submitit)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="training notebooks side by side, each in its own process: without GPUs, each with "
                        "cores/N CPU threads; with GPUs, taking them in turn (default: one per GPU, else 1)")
    p.add_argument("--slurm-partition", help="Slurm partition")
    p.add_argument("--slurm-gpus-per-job", type=int, help="GPUs per training job (default 1)")
    p.add_argument("--slurm-cpus-per-job", type=int, help="CPU cores per training job (default 8)")
    p.add_argument("--slurm-mem-gb", type=float, help="memory per job in GB (default: the partition's)")
    p.add_argument("--slurm-time-min", type=int, help="time limit per job in minutes (default 240)")
    p.add_argument("--slurm-max-requeues", type=int, help="requeues after pre-emption or time-out (default 3)")
    p.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                   help="another sbatch option, e.g. account=lab or constraint=a100 (repeatable)")
    p.add_argument("--slurm-folder", help="submitit's logs and pickles (default <sweep>/slurm; a shared file system)")
    p.add_argument("--slurm-cluster", choices=("slurm", "local"),
                   help="local: submit the same jobs to submitit's local backend (a dry run before a cluster)")
    p.set_defaults(func=_cmd_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; bad input exits 2 with a one-line reason."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tongue-nb: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError, PermissionError,
            RuntimeError, OSError) as exc:
        # Bad input (ValueError, missing files) exits 2; a refusal or a failed run (RuntimeError: a held
        # lock, a refused checkpoint, a non-finite loss, a full disk) and any other OSError exit 1.
        # Either way one line, no traceback.
        known_input = (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError, PermissionError)
        code = 2 if isinstance(exc, known_input) and not isinstance(exc, RuntimeError) else 1
        # One line: the first line of the message names the file/row/parameter; details follow when verbose.
        lines = (str(exc).strip() or type(exc).__name__).splitlines()
        if args.verbose:
            log.exception("failed")
        more = " (more with -v)" if len(lines) > 1 and not args.verbose else ""
        print(f"tongue-nb {args.command}: error: {lines[0]}{more}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
