"""Every params/<backbone>.yaml loads through params.load_params and holds the seed's settings."""
from pathlib import Path

import pytest
import yaml

from tongue_nb.train.params import TrainParams, load_params

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"
SHORT_NAMES = ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "swin_tiny",
               "swin_small", "swin_base", "swin_large", "vit_base", "vit_large"]


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_loads_and_only_overrides_defaults(path: Path) -> None:
    raw = yaml.safe_load(path.read_text()) or {}
    # A cross-validating recipe (folds: K) is a sweep's: each of its runs trains one fold, here the first.
    fold = {"fold": 0} if raw.get("folds") else {}
    params = load_params([path], **fold)
    defaults = TrainParams()
    # A parameter file only changes defaults: every key it sets is a real field with a new value.
    for key, value in raw.items():
        if key == "per_backbone":  # sections: each one's values also only change what the file gives
            for backbone, section in value.items():
                own = load_params([path], backbone=backbone, **fold)
                # ... or what the backbone's own file sets, which the section overrides when layered under it
                mine = PARAMS_DIR / f"{backbone}.yaml"
                under = load_params([mine]) if mine.is_file() else params
                for k, v in section.items():
                    assert getattr(own, k) == getattr(load_params(**{k: v}), k), f"{path.name}: {backbone}.{k}"
                    assert getattr(own, k) != getattr(params, k) or getattr(own, k) != getattr(under, k), \
                        f"{path.name}: per_backbone.{backbone}.{k} repeats the file's value"
            continue
        assert getattr(params, key) == getattr(load_params(**{key: value}, **(fold if key == "folds" else {})), key)
        # `backbone` names the file's model even where it is the default (convnext_tiny).
        assert key == "backbone" or getattr(params, key) != getattr(defaults, key), \
            f"{path.name}: {key} repeats the default"


@pytest.mark.parametrize("name", SHORT_NAMES)
def test_one_file_per_short_name(name: str) -> None:
    params = load_params([PARAMS_DIR / f"{name}.yaml"])
    assert params.backbone == name


def test_seed_document_settings() -> None:
    def get(name: str) -> TrainParams:
        return load_params([PARAMS_DIR / f"{name}.yaml"])

    assert get("convnext_base").batch_size == 16
    cl = get("convnext_large")
    assert (cl.batch_size, cl.stage2_lr_backbone, cl.stage2_lr_head, cl.stage2_epochs) == (8, 2e-5, 1e-4, 40)
    sb = get("swin_base")
    assert (sb.batch_size, sb.stage2_lr_backbone, sb.stage2_epochs) == (16, 3e-5, 40)
    sl = get("swin_large")
    assert (sl.batch_size, sl.batch_size * sl.accumulation_steps) == (4, 16)
    vl = get("vit_large")
    assert (vl.batch_size, vl.accumulation_steps) == (2, 8)


def test_large_gpu_recipe_keeps_each_backbones_effective_batch_and_rates() -> None:
    """params/gpu_large.yaml over params/<backbone>.yaml (the sweep's layering): one step per effective batch."""
    for name in SHORT_NAMES:
        small = load_params([PARAMS_DIR / f"{name}.yaml"])
        large = load_params([PARAMS_DIR / f"{name}.yaml", PARAMS_DIR / "gpu_large.yaml"], backbone=name)
        assert large.batch_size * large.accumulation_steps == small.batch_size * small.accumulation_steps, name
        assert large.accumulation_steps == 1 and large.precision == "bf16" and large.device == "cuda", name
        assert (large.stage2_lr_backbone, large.stage2_lr_head) == (small.stage2_lr_backbone, small.stage2_lr_head)
