"""Model comparison: size, short-budget validation loss, speed and memory of several backbones on one dataset.

Every backbone gets the same data, split, seed, batches and number of optimizer steps, so the
validation losses are comparable. Speeds are measured after warm-up over many steps (a single
cold step mostly times allocator and kernel set-up).

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated` after a reset at the start of the backbone.
- CPU: the increase of the process's peak resident set size (VmHWM) over its RSS at the start of
  the backbone. With `isolate=True` (default) each backbone runs in a fresh process, so freed
  memory of an earlier model cannot be reused and hide a later model's need; on Linux the peak
  counter is reset right before the model is built (`/proc/self/clear_refs`), so the set-up's own
  peak (e.g. decoding labels) is not counted either. In-process (`isolate=False`) figures can be
  lower than the truth for every backbone after the first (the allocator reuses freed pages).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import re
import resource
import sys
import time
import traceback
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from tongue_nb import runfiles
from tongue_nb.train.params import CROPS, ON_PROBLEM, ParamError, check_device, check_fields, coerce_fields, param

log = logging.getLogger(__name__)

COLUMNS = ["backbone", "timm_name", "params_total_m", "params_trainable_m", "val_loss", "val_loss_se", "train_loss_first",
           "train_loss_last", "train_samples_per_s", "infer_samples_per_s", "peak_memory_mb", "memory_method",
           "device", "steps", "batch_size", "image_size", "seconds", "error"]
RECOMMENDATIONS = {"lowest_val_loss": ("val_loss", "min"), "fastest": ("train_samples_per_s", "max"),
                   "largest": ("params_total_m", "max")}


class CompareError(ValueError):
    """The comparison cannot run on this data (split too small, no validation samples, no data)."""


@dataclass
class CompareParams:
    """Every option of the comparison, typed and checked like TrainParams (the same field checker).

    The fields it shares with a training recipe have the same names and meaning; `from_recipe` takes them
    from a TrainParams, so the screen sees the data, split, image size and batch the runs will use.
    """

    data_dir: str = param("", "dataset folder with labels.csv")
    tasks: str = param("", "task schema YAML; empty: <data_dir>/tasks.yaml")
    steps: int = param(20, "optimizer steps per backbone: the identical short training budget", gt=0)
    warmup_steps: int = param(3, "first steps left out of the speed timing", ge=0)
    batch_size: int = param(8, "samples per step, the same for every backbone", gt=0)
    image_size: int = param(128, "square input size in px, the same for every backbone", ge=8, le=4096)
    lr: float = param(1e-4, "AdamW learning rate during the budget", gt=0.0)
    seed: int = param(0, "split, initialisation and batch order", ge=0)
    pretrained: bool = param(False, "start from pretrained weights (tongue_nb.model.weights)")
    device: str = param("auto", "auto, cpu, cuda or cuda:N")
    crop: str = param("crop", "tongue mask use: none, crop, blank, crop_blank", choices=CROPS)
    eval_batches: int = param(0, "validation batches for the loss; 0: the whole validation split", ge=0)
    infer_steps: int = param(0, "timed inference batches after warm-up; 0: steps", ge=0)
    isolate: bool = param(True, "one fresh process per backbone: honest CPU peak memory, crash isolation")
    num_threads: int = param(0, "torch CPU threads; 0: torch default", ge=0)
    on_problem: str = param("error", "bad label rows: error, drop or report", choices=ON_PROBLEM)

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_fields(self)
        if self.warmup_steps >= self.steps:
            raise ParamError(f"parameter warmup_steps: got {self.warmup_steps}, expected fewer than steps="
                             f"{self.steps} (the steps after warm-up are the timed ones)")
        check_device(self.device)

    @classmethod
    def from_recipe(cls, recipe: Any, **screen: Any) -> "CompareParams":
        """The comparison of a training recipe (TrainParams): its data, tasks, split seed, image size (0: 224),
        batch size, pretraining, device, crop, threads and label handling; `screen` sets the rest (steps, ...)."""
        shared = {"data_dir": recipe.data_dir, "tasks": recipe.tasks, "seed": recipe.effective_split_seed,
                  "image_size": recipe.image_size or 224, "batch_size": recipe.batch_size,
                  "pretrained": recipe.pretrained, "device": recipe.device, "crop": recipe.crop,
                  "num_threads": recipe.num_threads, "on_problem": recipe.on_problem}
        return cls(**{**shared, **screen})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_backbones(backbones: str | Sequence[str]) -> list[str]:
    """A comma/space-separated string or a list of names -> a list of non-empty, unique names in order."""
    if isinstance(backbones, str):
        items = re.split(r"[,\s]+", backbones)
    else:
        items = [str(b) for b in backbones]
    names: list[str] = []
    for item in (i.strip() for i in items):
        if item and item not in names:
            names.append(item)
    if not names:
        raise CompareError(f"parameter backbones: got {backbones!r}, expected at least one backbone name")
    return names


# ---------------------------------------------------------------------------- memory helpers

def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil  # non-Linux fallback

    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (since start or the last reset)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux kB


# ---------------------------------------------------------------------------- data and one backbone

@dataclass
class _Data:
    schema: Any
    images: np.ndarray
    targets: dict[str, np.ndarray]
    weights: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray


def _prepare_data(cfg: dict[str, Any]) -> _Data:
    """Labels, split and image cache: built once by the parent, re-opened (cache hit) by each child."""
    from tongue_nb.data import cache
    from tongue_nb.data import splits
    from tongue_nb.data.labels import load_labels
    from tongue_nb.data.tasks import load_schema

    schema = load_schema(cfg["tasks"]) if cfg["tasks"] else None
    labels = load_labels(cfg["data_dir"], schema=schema, on_problem=cfg["on_problem"])
    split = np.asarray(splits.make_split(labels.table, labels.targets, labels.schema, seed=cfg["seed"]))
    train_idx = np.flatnonzero(split == "train")
    val_idx = np.flatnonzero(split == "val")
    if len(train_idx) < cfg["batch_size"]:
        raise CompareError(f"{cfg['data_dir']}: the train split has {len(train_idx)} samples, fewer than "
                           f"batch_size={cfg['batch_size']}")
    if len(val_idx) == 0:
        raise CompareError(f"{cfg['data_dir']}: the validation split is empty; the comparison needs val samples")
    img_cache = cache.build_cache(labels, cfg["image_size"], crop=cfg["crop"])
    return _Data(labels.schema, img_cache.images, labels.targets,
                 labels.table["weight"].to_numpy(np.float32), train_idx, val_idx)


def _resolve_device(device: str):
    """The training runtime's device choice (tongue_nb.train.runtime), as a comparison error when unavailable."""
    from tongue_nb.train.runtime import TrainingError, resolve_device

    try:
        return resolve_device(device)
    except TrainingError as exc:
        raise CompareError(str(exc)) from None


def _cycle(loader) -> Iterator[Any]:
    """Endless batches: pass after pass over the loader, a new epoch (new shuffle) each pass."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise CompareError("the data loader produced no batch (split smaller than one batch?)")
        epoch += 1


def _to_device(batch: Any, dev: Any) -> tuple[Any, dict[str, Any], Any]:
    """A batch's images, targets and weights on the measuring device."""
    return (batch.x.to(dev, non_blocking=True), {k: v.to(dev, non_blocking=True) for k, v in batch.targets.items()},
            batch.weight.to(dev, non_blocking=True))


def _val_loss(model: Any, val_loader: Any, loss_fn: Any, dev: Any, eval_batches: int | None) -> tuple[float, float]:
    """The validation loss after the budget (sample-weighted mean over the evaluated batches) and its spread: the
    standard error of the batch losses (how far apart two losses can be by chance). Call under no_grad."""
    loss_sum = count = 0.0
    batch_losses = []
    for i, batch in enumerate(val_loader):
        if eval_batches is not None and i >= eval_batches:
            break
        x, y, w = _to_device(batch, dev)
        total, _ = loss_fn(model(x), y, w)
        loss_sum += float(total) * len(x)
        count += len(x)
        batch_losses.append(float(total))
    se = float(np.std(batch_losses, ddof=1) / np.sqrt(len(batch_losses))) if len(batch_losses) > 1 else float("nan")
    return (loss_sum / count if count else float("nan")), se


def _infer_speed(model: Any, val_loader: Any, dev: Any, warmup_steps: int, infer_steps: int,
                 sync: Any) -> float:
    """Inference samples per second: forward passes on validation batches after `warmup_steps`. Call under no_grad."""
    vbatches = _cycle(val_loader)
    n_seen = 0
    t_inf = 0.0
    for i in range(warmup_steps + infer_steps):
        if i == warmup_steps:
            sync()
            t_inf = time.perf_counter()
        batch = next(vbatches)
        model(batch.x.to(dev, non_blocking=True))
        if i >= warmup_steps:
            n_seen += len(batch.x)
    sync()
    return n_seen / (time.perf_counter() - t_inf)


def _measure(name: str, data: _Data, cfg: dict[str, Any]) -> dict[str, Any]:
    """Build, train `steps` steps, evaluate and time one backbone; raises on any failure."""
    import torch

    from tongue_nb.data.loader import BatchLoader
    from tongue_nb.model.losses import MultiTaskLoss
    from tongue_nb.model.backbones import MultiTaskBackbone

    dev = _resolve_device(cfg["device"])
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    # Memory baseline before the model exists: the data (memory-mapped cache) is already open.
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        mem0 = torch.cuda.memory_allocated(dev)
        method = "cuda_max_allocated"
    else:
        reset = _reset_peak_rss()
        mem0 = _current_rss_bytes()
        method = "cpu_peak_rss_increase" + ("" if cfg["isolated"] else "_in_process") + ("" if reset else "_unreset")

    torch.manual_seed(cfg["seed"])  # identical head initialisation for every backbone
    # image_size given: ViT/Swin are built for it, so every backbone sees the same inputs.
    model = MultiTaskBackbone(name, data.schema, pretrained=cfg["pretrained"], freeze_backbone=False,
                              image_size=cfg["image_size"]).to(dev)
    counts = model.params_m()
    mean, std = model.mean, model.std
    loss_fn = MultiTaskLoss(data.schema)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    bs = cfg["batch_size"]

    # Same seed for every backbone: the same samples in the same order, step for step.
    train_loader = BatchLoader(data.images, data.targets, data.weights, data.train_idx, bs, mean, std,
                               shuffle=True, augment=False, seed=cfg["seed"], drop_last=True)
    val_loader = BatchLoader(data.images, data.targets, data.weights, data.val_idx, bs, mean, std,
                             shuffle=False, augment=False, seed=cfg["seed"])

    # --- the identical short training budget; the steps after warm-up are also the speed sample
    model.train()
    losses = []
    batches = _cycle(train_loader)
    t_start = None
    for step in range(cfg["steps"]):
        if step == cfg["warmup_steps"]:
            sync()
            t_start = time.perf_counter()
        x, y, w = _to_device(next(batches), dev)
        total, _ = loss_fn(model(x), y, w)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(total.detach())  # no .item() here: it would add a device sync per step
    sync()
    train_time = time.perf_counter() - t_start
    timed_steps = cfg["steps"] - cfg["warmup_steps"]
    losses_cpu = torch.stack(losses).float().cpu().numpy()
    if not np.isfinite(losses_cpu).all():
        bad = int(np.flatnonzero(~np.isfinite(losses_cpu))[0]) + 1
        raise FloatingPointError(f"{name}: training loss is {losses_cpu[bad - 1]} at step {bad} (lr={cfg['lr']:g})")

    model.eval()
    with torch.no_grad():
        val_loss, val_loss_se = _val_loss(model, val_loader, loss_fn, dev, cfg["eval_batches"])
        infer_samples_per_s = _infer_speed(model, val_loader, dev, cfg["warmup_steps"], cfg["infer_steps"], sync)

    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) - mem0
    else:
        peak = _peak_rss_bytes() - mem0
    return {
        "timm_name": model.timm_name,
        "params_total_m": counts["total"],
        "params_trainable_m": counts["trainable"],
        "val_loss": val_loss,
        "val_loss_se": val_loss_se,
        "train_loss_first": float(losses_cpu[0]),
        "train_loss_last": float(losses_cpu[-1]),
        "train_samples_per_s": timed_steps * bs / train_time,
        "infer_samples_per_s": infer_samples_per_s,
        "peak_memory_mb": max(peak, 0) / 2 ** 20,
        "memory_method": method,
        "device": str(dev),
    }


def _run_one(name: str, data: _Data | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """One row: the measurements, or the error that stopped this backbone."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"backbone": name, "steps": cfg["steps"], "batch_size": cfg["batch_size"],
                           "image_size": cfg["image_size"], "error": ""}
    try:
        if cfg["num_threads"]:
            import torch

            torch.set_num_threads(cfg["num_threads"])
        if data is None:
            data = _prepare_data(cfg)
        row.update(_measure(name, data, cfg))
    except Exception as exc:  # one failing backbone (unknown name, OOM, bug) must not stop the others
        log.warning("backbone %s failed: %s: %s", name, type(exc).__name__, exc)
        log.debug("%s", traceback.format_exc())
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        _free_cuda()
    row["seconds"] = time.perf_counter() - t0
    return row


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - cleanup must never mask the real error
        pass


def _child_main(name: str, cfg: dict[str, Any], conn) -> None:
    """Entry point of the per-backbone process: send back one row."""
    logging.basicConfig(level=logging.WARNING)
    try:
        conn.send(_run_one(name, None, cfg))
    finally:
        conn.close()


def _run_isolated(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one backbone in a fresh spawned process; a crash or kill becomes the row's error."""
    ctx = mp.get_context("spawn")  # fork would inherit the parent's torch threads and allocations
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child_main, args=(name, cfg, send), name=f"compare-{name}", daemon=True)
    proc.start()
    send.close()
    row = None
    try:
        # poll instead of recv: a child that dies without sending must not hang the comparison
        while row is None and (proc.is_alive() or recv.poll()):
            if recv.poll(0.5):
                try:
                    row = recv.recv()
                except EOFError:
                    break
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    if row is None:
        code = proc.exitcode
        why = " (killed: out of memory?)" if code in (-9, 137) else ""
        row = {"backbone": name, "steps": cfg["steps"], "batch_size": cfg["batch_size"],
               "image_size": cfg["image_size"], "seconds": time.perf_counter() - t0,
               "error": f"ChildProcessError: the measuring process exited with code {code}{why} without a result"}
    return row


# ---------------------------------------------------------------------------- public API

def compare_backbones(params: CompareParams, backbones: str | Sequence[str],
                      out_dir: str | Path | None = None) -> pd.DataFrame:
    """Compare backbones on one dataset: parameters, val loss after `steps` identical steps, samples/s, memory.

    One row per backbone (columns `COLUMNS`); a failing backbone gets its `error` and the others
    still run. With `out_dir`, writes `comparison.csv` and `comparison.json` (rows + recommendations).
    `params` (CompareParams, or CompareParams.from_recipe(train_params, ...)) holds every setting.
    """
    if not isinstance(params, CompareParams):
        raise TypeError(f"compare_backbones: expected CompareParams, got {type(params).__name__}")
    names = parse_backbones(backbones)
    if not params.data_dir or not Path(params.data_dir).is_dir():
        raise CompareError(f"parameter data_dir: dataset folder not found: {params.data_dir!r}")
    _resolve_device(params.device)  # fail now, not once per backbone
    if out_dir is not None:  # a folder it cannot write is refused before the comparison, not after it
        from tongue_nb.paths import check_outside_dataset
        from tongue_nb.runio import held_by_another

        check_outside_dataset(out_dir, params.data_dir)
        held = held_by_another(out_dir, "comparison.json")
        if held:  # a run's or sweep's folder keeps its own records (a sweep's comparison goes to <sweep>/comparison)
            raise CompareError(f"parameter out_dir: {out_dir} holds {held}; the comparison's files would mix with "
                               "its records: choose a folder of its own")

    cfg = {"data_dir": str(params.data_dir), "tasks": params.tasks, "steps": params.steps,
           "warmup_steps": params.warmup_steps, "batch_size": params.batch_size, "image_size": params.image_size,
           "lr": params.lr, "seed": params.seed, "pretrained": params.pretrained, "device": params.device,
           "eval_batches": params.eval_batches or None, "infer_steps": params.infer_steps or params.steps,
           "crop": params.crop, "isolated": params.isolate, "num_threads": params.num_threads,
           "on_problem": params.on_problem}
    # Labels, split and cache once here: data errors surface before any model is built, and the
    # children (or the in-process loop) only re-open the cache.
    data = _prepare_data(cfg)
    rows = []
    for name in names:
        log.info("comparing %s (%d steps, batch %d, %d px)", name, params.steps, params.batch_size, params.image_size)
        row = _run_isolated(name, cfg) if params.isolate else _run_one(name, data, cfg)
        rows.append(row)
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    df["error"] = df["error"].fillna("").astype(str)
    if out_dir is not None:
        save_comparison(df, out_dir, settings=params.as_dict())
    return df


def recommendations(df: pd.DataFrame) -> dict[str, str | None]:
    """The seed's three picks among successful rows: lowest_val_loss, fastest (train samples/s), largest (params)."""
    ok = df[(df["error"].fillna("") == "")] if "error" in df else df
    out: dict[str, str | None] = {}
    for key, (column, how) in RECOMMENDATIONS.items():
        values = pd.to_numeric(ok[column], errors="coerce") if column in ok else pd.Series(dtype=float)
        values = values[np.isfinite(values)]
        if values.empty:
            out[key] = None
            continue
        idx = values.idxmin() if how == "min" else values.idxmax()
        out[key] = str(ok.loc[idx, "backbone"])
    return out


def screen_table(df: pd.DataFrame) -> pd.DataFrame:
    """The comparison as what it is, a cost and speed screen: one row per backbone that finished, with the
    seed's three picks (lowest validation loss, fastest, largest) marked in a `pick` column instead of a dict."""
    ok = df[(df["error"].fillna("") == "")] if "error" in df else df
    picks = recommendations(df)
    cols = {"backbone": "backbone", "params_total_m": "parameters (M)", "val_loss": "val loss",
            "val_loss_se": "val loss standard error",
            "train_loss_first": "train loss, first step", "train_loss_last": "train loss, last step",
            "train_samples_per_s": "train samples/s", "infer_samples_per_s": "inference samples/s",
            "peak_memory_mb": "peak memory (MB)"}
    table = ok[[c for c in cols if c in ok]].rename(columns=cols).reset_index(drop=True)
    table["pick"] = [", ".join(k.replace("_", " ") for k, v in picks.items() if v == b) for b in table["backbone"]]
    return table


def save_comparison(df: pd.DataFrame, out_dir: str | Path, settings: dict[str, Any] | None = None) -> Path:
    """Write `comparison.csv` and `comparison.json` (rows, recommendations, settings) into `out_dir`."""
    from tongue_nb.runio import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", df.to_csv(index=False))
    atomic_write_json(out / "comparison.json", {"rows": df.to_dict(orient="records"),
                                                "recommendations": recommendations(df),
                                                "settings": settings or {}})
    return out


def load_comparison(out_dir: str | Path) -> pd.DataFrame:
    """Read back the `comparison.csv` written by `compare_backbones`/`save_comparison`."""
    path = Path(out_dir) / "comparison.csv"
    df = runfiles.read_csv(path, "a comparison table written by compare_backbones(..., out_dir=...) (CSV with an "
                                 "error column)", columns=("error",), keep_default_na=True)
    df["error"] = df["error"].fillna("").astype(str)
    return df


def _ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"].fillna("") == ""]


def _empty_figure(message: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2))
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def plot_params_vs_loss(df: pd.DataFrame):
    """Scatter of total parameters (M) against validation loss, one labelled point per successful backbone."""
    from matplotlib.figure import Figure

    ok = _ok_rows(df).dropna(subset=["params_total_m", "val_loss"])
    if len(ok) < 2:  # a one-point scatter says nothing a table row does not
        return _empty_figure("fewer than two backbones finished: nothing to compare (see the table)")
    # A Figure not registered with pyplot: no global state, and notebooks show it exactly once.
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(ok["params_total_m"], ok["val_loss"], s=40)
    for _, r in ok.iterrows():
        ax.annotate(str(r["backbone"]), (r["params_total_m"], r["val_loss"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if ok["params_total_m"].max() / max(ok["params_total_m"].min(), 1e-9) > 20:
        ax.set_xscale("log")  # tiny and large models together: a linear axis squashes the small ones
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"validation loss after {int(ok['steps'].iloc[0])} steps")
    ax.set_title("model size vs short-budget validation loss")
    ax.grid(alpha=0.3)
    return fig


def plot_speed(df: pd.DataFrame):
    """Horizontal bars of training and inference samples/s per successful backbone."""
    from matplotlib.figure import Figure

    ok = _ok_rows(df).dropna(subset=["train_samples_per_s", "infer_samples_per_s"])
    if ok.empty:
        return _empty_figure("no backbone finished: nothing to plot")
    fig = Figure(figsize=(6.5, 1.2 + 0.5 * len(ok)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(ok))
    ax.barh(y - 0.2, ok["train_samples_per_s"], height=0.4, label="training")
    ax.barh(y + 0.2, ok["infer_samples_per_s"], height=0.4, label="inference")
    ax.set_yticks(y, ok["backbone"].astype(str))
    ax.invert_yaxis()
    ax.set_xlabel(f"samples/s ({ok['device'].iloc[0]}, batch {int(ok['batch_size'].iloc[0])})")
    ax.set_title("throughput after warm-up")
    fig.legend(loc="outside right upper")  # beside the axes: never over a bar
    ax.grid(axis="x", alpha=0.3)
    return fig
