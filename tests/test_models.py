"""Backbone registry, MultiTaskBackbone, pretrained loading and ensembles (all pretrained=False, tiny inputs)."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from tongue_nb.model import backbones as models
from tongue_nb.model.losses import MultiTaskLoss
from tongue_nb.runfiles import RunFileError
from tongue_nb.model.backbones import (BACKBONES, MultiTaskBackbone, list_backbones, load_run_model, register_backbone,
                                       resolve_backbone, to_probs)
from tongue_nb.model.ensemble import EnsembleMultiTaskModel
from tongue_nb.model.weights import PretrainedWeightsError
from tongue_nb.data.tasks import Task, TaskSchema, default_schema

SCHEMA = TaskSchema((
    Task("shape", "multilabel", ("spots", "cracks", "teethmarks"), 0.5),
    Task("coat", "multiclass", ("greasy", "rotten", "nospecialgreasy"), 0.5),
    Task("fissure", "binary", ("fissure",)),
))

# The architecture each short name must build, written from the papers / timm model cards:
# (timm class, stage depths, widths or embed dim, extra check). The seed system built several wrong.
ARCH = {
    "convnext_tiny": ("ConvNeXt", (3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ("ConvNeXt", (3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ("ConvNeXt", (3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ("ConvNeXt", (3, 3, 27, 3), (192, 384, 768, 1536)),
    "swin_tiny": ("SwinTransformer", (2, 2, 6, 2), 96),
    "swin_small": ("SwinTransformer", (2, 2, 18, 2), 96),
    "swin_base": ("SwinTransformer", (2, 2, 18, 2), 128),
    "swin_large": ("SwinTransformer", (2, 2, 18, 2), 192),
    "vit_base": ("VisionTransformer", 12, 768),
    "vit_large": ("VisionTransformer", 24, 1024),
}


def check_architecture(short: str, bb: torch.nn.Module) -> None:
    cls, depth, width = ARCH[short]
    assert type(bb).__name__ == cls
    if cls == "ConvNeXt":
        assert tuple(len(s.blocks) for s in bb.stages) == depth
        assert tuple(s.blocks[0].conv_dw.in_channels for s in bb.stages) == width
    elif cls == "SwinTransformer":
        assert tuple(len(layer.blocks) for layer in bb.layers) == depth
        assert bb.embed_dim == width and bb.num_features == width * 8
        assert bb.patch_embed.proj.kernel_size == (4, 4)
        assert bb.layers[0].blocks[0].window_size == (7, 7)  # window 7 as named (stage 1 at 32 px: 8x8 grid)
    else:
        assert len(bb.blocks) == depth and bb.embed_dim == width
        assert bb.patch_embed.proj.kernel_size == (16, 16)
        assert bb.blocks[0].attn.num_heads == width // 64


@pytest.mark.parametrize("short", sorted(ARCH))
def test_every_short_name_builds_the_named_architecture(short):
    # On the meta device: the full module tree and shape propagation without allocating or
    # initialising hundreds of millions of weights, so every short name is checked in every run.
    with torch.device("meta"):
        model = MultiTaskBackbone(short, SCHEMA, pretrained=False, image_size=32)
        out = model(torch.randn(2, 3, 32, 32))
    assert model.timm_name == BACKBONES[short]
    check_architecture(short, model.backbone)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"shape": (2, 3), "coat": (2, 3), "fissure": (2, 1)}
    assert model.data_config["input_size"] == (3, 32, 32)


# A real forward pass with real (random) weights: the two smallest in every run, the others (5-20 s
# each on a busy 2-core machine, mostly weight initialisation) behind the slow marker; ViT's real
# forward/backward path is also exercised every run by the timm test_vit tests below.
_REAL = [s if s in ("convnext_tiny", "swin_tiny") else pytest.param(s, marks=pytest.mark.slow)
         for s in sorted(ARCH)]


@pytest.mark.parametrize("short", _REAL)
def test_every_short_name_runs_a_real_forward_pass(short):
    torch.manual_seed(0)
    model = MultiTaskBackbone(short, SCHEMA, pretrained=False, image_size=32).eval()
    check_architecture(short, model.backbone)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"shape": (2, 3), "coat": (2, 3), "fissure": (2, 1)}
    assert all(torch.isfinite(v).all() for v in out.values())


def test_registry_lists_resolves_and_refuses():
    assert list_backbones() == sorted(ARCH)
    assert resolve_backbone("swin_tiny") == "swin_tiny_patch4_window7_224"
    assert resolve_backbone("resnet18") == "resnet18"  # any timm name
    assert resolve_backbone("convnext_tiny.fb_in22k") == "convnext_tiny.fb_in22k"  # with a pretrained tag
    with pytest.raises(ValueError) as err:
        resolve_backbone("convnext_tinny")
    msg = str(err.value)
    assert "convnext_tinny" in msg and "swin_tiny, vit_base, vit_large" in msg and "did you mean convnext_tiny" in msg
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("swin_tiny", "swin_small_patch4_window7_224")
    with pytest.raises(ValueError, match="not a timm model"):
        register_backbone("mine", "no_such_model_xyz")
    with pytest.raises(TypeError):
        BACKBONES["x"] = "resnet18"  # read-only view: only register_backbone adds names
    register_backbone("tiny_test_convnext", "test_convnext")
    try:
        assert resolve_backbone("tiny_test_convnext") == "test_convnext"
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("tiny_test_convnext", "test_vit")
    finally:
        models._REGISTRY.pop("tiny_test_convnext")


@pytest.mark.parametrize("name,size", [("test_convnext", 48), ("test_vit", 32), ("test_efficientnet", 32)])
def test_forward_shapes_and_every_parameter_gets_a_gradient(name, size):
    torch.manual_seed(0)
    model = MultiTaskBackbone(name, SCHEMA, pretrained=False, freeze_backbone=False, drop_rate=0.1, image_size=size)
    model.train()
    x = torch.randn(3, 3, size, size)
    out = model(x)
    targets = {"shape": torch.tensor([[1.0, 0, float("nan")], [0, 1, 1], [1, 1, 0]]),
               "coat": torch.tensor([0, 2, 1]), "fissure": torch.tensor([[1.0], [0.0], [1.0]])}
    total, _ = MultiTaskLoss(SCHEMA)(out, targets, None)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    probs = to_probs(SCHEMA, out)
    assert torch.allclose(probs["coat"].sum(1), torch.ones(3))
    assert ((probs["shape"] >= 0) & (probs["shape"] <= 1)).all()


def test_feature_width_uses_head_hidden_size():
    # MobileNetV3 pools to head_hidden_size (1024) features, not num_features (288).
    model = MultiTaskBackbone("mobilenetv3_small_050", SCHEMA, pretrained=False).eval()
    assert model.backbone.num_features != model.backbone.head_hidden_size
    assert model.heads["coat"][1].in_features == model.backbone.head_hidden_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))["coat"].shape == (1, 3)


def test_data_config_from_pretrained_config():
    vit = MultiTaskBackbone("test_vit", SCHEMA, pretrained=False, image_size=32)
    assert vit.data_config["input_size"] == (3, 32, 32) and vit.mean == (0.5, 0.5, 0.5)
    eff = MultiTaskBackbone("test_efficientnet", SCHEMA, pretrained=False)
    assert eff.input_size == eff.backbone.pretrained_cfg["input_size"][-1]
    assert eff.mean == (0.485, 0.456, 0.406) and eff.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="image_size"):
        MultiTaskBackbone("test_vit", SCHEMA, pretrained=False, image_size=0)
    with pytest.raises(ValueError, match="image_size 40 does not fit backbone 'test_vit'.*patch size 16"):
        MultiTaskBackbone("test_vit", SCHEMA, pretrained=False, image_size=40)
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        MultiTaskBackbone("nope", SCHEMA, pretrained=False)


def test_freeze_keeps_backbone_in_eval_and_out_of_the_optimizer():
    torch.manual_seed(0)
    model = MultiTaskBackbone("test_efficientnet", SCHEMA, pretrained=False, image_size=32)  # frozen by default
    assert model.backbone_frozen
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    model.train()
    assert model.training and not model.backbone.training and model.heads.training
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(bn.running_mean, before)  # BN statistics stay frozen in stage 1
    groups = model.param_groups(lr_backbone=1e-5, lr_head=1e-3, weight_decay=0.05)
    assert {g["name"] for g in groups} == {"head_decay", "head_no_decay"}
    pm = model.params_m()
    assert pm["trainable"] == pytest.approx(sum(p.numel() for p in model.heads.parameters()) / 1e6)
    assert pm["total"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)

    model.unfreeze_backbone()
    assert all(p.requires_grad for p in model.parameters()) and model.backbone.training
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(bn.running_mean, before)
    model.eval()
    assert not model.backbone.training
    assert model.params_m()["trainable"] == pytest.approx(pm["total"])


def test_param_groups_no_decay_on_norms_biases_and_embeddings():
    model = MultiTaskBackbone("test_vit", SCHEMA, pretrained=False, freeze_backbone=False, image_size=32)
    groups = model.param_groups(lr_backbone=2e-5, lr_head=1e-4, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    named = dict(model.named_parameters())
    where = {n: next(k for k, v in ids.items() if id(p) in v) for n, p in named.items()}
    assert sum(len(v) for v in ids.values()) == len(named)  # every parameter exactly once
    assert where["backbone.pos_embed"] == "backbone_no_decay"
    assert where["backbone.cls_token"] == "backbone_no_decay"
    assert where["backbone.blocks.0.norm1.weight"] == "backbone_no_decay"
    assert where["backbone.blocks.0.attn.qkv.bias"] == "backbone_no_decay"
    assert where["backbone.blocks.0.attn.qkv.weight"] == "backbone_decay"
    assert where["backbone.patch_embed.proj.weight"] == "backbone_decay"
    assert where["heads.coat.1.weight"] == "head_decay" and where["heads.coat.1.bias"] == "head_no_decay"
    assert by_name["backbone_decay"]["lr"] == 2e-5 and by_name["head_no_decay"]["lr"] == 1e-4
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0 and by_name["head_decay"]["weight_decay"] == 0.05
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [2e-5, 2e-5, 1e-4, 1e-4]
    with pytest.raises(ValueError, match="lr_head"):
        model.param_groups(1e-5, float("nan"), 0.0)


# ----------------------------------------------------------------- pretrained weights


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_from_file_and_folder_round_trip(tmp_path):
    torch.manual_seed(1)
    src = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=False)
    # a plain backbone state dict as .safetensors
    save_file(src.backbone.state_dict(), str(tmp_path / "w.safetensors"))
    torch.manual_seed(2)
    dst = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "w.safetensors")
    assert _weights_equal(src.backbone, dst.backbone)
    assert dst.pretrained_info["loaded"] == dst.pretrained_info["total"] and not dst.pretrained_info["missing"]
    assert dst.backbone_frozen
    # a hub-style folder holding pytorch_model.bin of a timm classifier (its 1000-class head is ignored)
    import timm
    torch.manual_seed(3)
    clf = timm.create_model("test_convnext", pretrained=False)  # with classifier head.fc
    (tmp_path / "hub").mkdir()
    torch.save(clf.state_dict(), tmp_path / "hub" / "pytorch_model.bin")
    dst2 = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "hub")
    clf.reset_classifier(0)
    assert _weights_equal(clf, dst2.backbone)
    # a whole MultiTaskBackbone checkpoint wrapped like a training script would ({"state_dict": ...}, DDP prefix)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ckpt.pth")
    dst3 = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "ckpt.pth")
    assert _weights_equal(src.backbone, dst3.backbone)
    assert not _weights_equal(src, dst3)  # heads are not taken from a backbone checkpoint


def test_pretrained_vit_at_another_size_resamples_position_embeddings(tmp_path):
    torch.manual_seed(0)
    src = MultiTaskBackbone("test_vit", SCHEMA, pretrained=False)  # 160 px: 10x10 patches
    save_file(src.backbone.state_dict(), str(tmp_path / "vit.safetensors"))
    dst = MultiTaskBackbone("test_vit", SCHEMA, pretrained=True, pretrained_path=tmp_path / "vit.safetensors",
                            image_size=32)
    assert dst.backbone.pos_embed.shape[1] < src.backbone.pos_embed.shape[1]
    # timm's checkpoint filter resampled the patch grid; prefix (class token) embeddings are copied as they are.
    k = src.backbone.num_prefix_tokens
    if k and not src.backbone.no_embed_class:
        assert torch.equal(dst.backbone.pos_embed[:, :k], src.backbone.pos_embed[:, :k])
    sa, sb = src.backbone.state_dict(), dst.backbone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "pos_embed")
    assert dst.pretrained_info["wrong_shape"] == []


def test_pretrained_errors_are_clear(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vit = MultiTaskBackbone("test_vit", SCHEMA, pretrained=False)
    save_file(vit.backbone.state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"does not look like weights for 'test_convnext'.*0 of"):
        MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "vit.safetensors")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedWeightsError, match="folder without model.safetensors or pytorch_model.bin"):
        MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "empty")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="cannot read weights file"):
        MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "junk.bin")
    # pretrained=False wins over a pretrained_path (random weights, with a warning), so no mismatch error here
    m = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=False, pretrained_path=tmp_path / "vit.safetensors")
    assert m.pretrained_info["source"] is None
    # A pickle that would run code is refused (torch.load with weights_only).
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
    with pytest.raises(PretrainedWeightsError, match="cannot read weights file"):
        MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True, pretrained_path=tmp_path / "evil.pth")


def test_offline_hub_gives_clear_error_then_uses_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(PretrainedWeightsError) as err:
        MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True)
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "pretrained_path" in msg and "model.safetensors" in msg
    # With the weights in the Hugging Face cache layout, offline loading works without network.
    torch.manual_seed(5)
    src = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=False)
    hub_id = models.timm.models.get_pretrained_cfg("test_convnext").hf_hub_id
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(src.backbone.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    dst = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=True)
    assert _weights_equal(src.backbone, dst.backbone)


# ----------------------------------------------------------------- ensembles


def _manual_mean_probs(members, x01):
    """Reference: each member gets x resized to its size and normalised with its mean/std; probabilities averaged."""
    probs = []
    for m in members:
        s = m.input_size
        xi = F.interpolate(x01, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        xi = (xi - torch.tensor(m.mean).view(1, 3, 1, 1)) / torch.tensor(m.std).view(1, 3, 1, 1)
        with torch.no_grad():
            probs.append(to_probs(m.schema, m(xi)))
    return {k: torch.stack([p[k] for p in probs]).mean(0) for k in probs[0]}


def test_ensemble_from_backbones_averages_probabilities_and_trains_as_one():
    torch.manual_seed(0)
    ens = EnsembleMultiTaskModel.from_backbones(["test_efficientnet", "test_vit"], SCHEMA, pretrained=False,
                                                freeze_backbone=False, image_size=32)
    ens.members[1] = MultiTaskBackbone("test_vit", SCHEMA, pretrained=False, freeze_backbone=False, image_size=48)
    ens = EnsembleMultiTaskModel(list(ens.members))  # members of different sizes and normalisations
    assert ens.input_size == 48 and ens.mean == (0.0, 0.0, 0.0) and ens.std == (1.0, 1.0, 1.0)
    ens.eval()
    x = torch.rand(3, 3, 48, 48)
    got = ens.predict_proba(x)
    want = _manual_mean_probs(list(ens.members), x)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    # training: logits of the mean probability feed the ordinary loss; every member learns
    ens.train()
    targets = {"shape": torch.tensor([[1.0, 0, 1], [0, 1, float("nan")], [1, 1, 0]]),
               "coat": torch.tensor([0, -1, 2]), "fissure": torch.tensor([[1.0], [0.0], [float("nan")]])}
    total, _ = MultiTaskLoss(SCHEMA)(ens(x), targets, None)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ens.parameters())
    groups = ens.param_groups(1e-5, 1e-3, 0.01)
    assert [g["name"] for g in groups] == ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(ens.parameters()))
    ens.freeze_backbone()
    assert {g["name"] for g in ens.param_groups(1e-5, 1e-3, 0.01)} == {"head_decay", "head_no_decay"}
    assert ens.params_m()["total"] == pytest.approx(sum(m.params_m()["total"] for m in ens.members))


def test_mean_prob_logits_is_stable_for_extreme_logits():
    member = [{"shape": torch.tensor([[40.0, -40.0, 0.0]]), "coat": torch.tensor([[100.0, -100.0, 0.0]]),
               "fissure": torch.tensor([[30.0]])},
              {"shape": torch.tensor([[40.0, -40.0, 2.0]]), "coat": torch.tensor([[-100.0, 100.0, 0.0]]),
               "fissure": torch.tensor([[-30.0]])}]
    z = models.mean_prob_logits(SCHEMA, member)
    p = to_probs(SCHEMA, z)
    assert all(torch.isfinite(v).all() for v in z.values())
    assert torch.allclose(p["coat"], torch.tensor([[0.5, 0.5, 0.0]]), atol=1e-6)
    assert torch.allclose(p["fissure"], torch.tensor([[0.5]]), atol=1e-6)
    assert p["shape"][0, 0] > 0.999 and p["shape"][0, 1] < 1e-6


def _fake_run(run_dir, backbone, image_size, schema, seed):
    """A run folder as the trainer writes it (docs/internals.md): params.yaml, tasks.yaml, best checkpoint."""
    torch.manual_seed(seed)
    model = MultiTaskBackbone(backbone, schema, pretrained=False, image_size=image_size or None)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump({"backbone": backbone, "image_size": image_size,
                                                         "drop_rate": 0.1, "batch_size": 4}))
    schema.to_yaml(run_dir / "tasks.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(run_dir / "checkpoints" / "best.safetensors"))
    return model.eval()


def test_ensemble_from_runs(tmp_path):
    a = _fake_run(tmp_path / "a", "test_efficientnet", 32, SCHEMA, seed=1)
    b = _fake_run(tmp_path / "b", "test_vit", 48, SCHEMA, seed=2)
    loaded = load_run_model(tmp_path / "a")
    assert _weights_equal(a, loaded) and not loaded.training
    ens = EnsembleMultiTaskModel.from_runs([tmp_path / "a", tmp_path / "b"])
    assert not ens.training and ens.input_size == 48
    x = torch.rand(2, 3, 64, 64)  # any size: resized per member
    got = ens.predict_proba(x)
    want = _manual_mean_probs([a, b], x)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    # errors name the run folder and what is wrong
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    default_schema().to_yaml(tmp_path / "c" / "tasks.yaml")
    with pytest.raises(ValueError, match="best.safetensors: weights that do not fit the model.*expected the weights of backbone .test_efficientnet."):
        EnsembleMultiTaskModel.from_runs([tmp_path / "a", tmp_path / "c"])
    (tmp_path / "d").mkdir()
    with pytest.raises(RunFileError, match="params.yaml: missing"):
        EnsembleMultiTaskModel.from_runs([tmp_path / "d"])
    other = TaskSchema((Task("coat", "multiclass", ("a", "b", "c")),))
    _fake_run(tmp_path / "e", "test_vit", 32, other, seed=3)
    _fake_run(tmp_path / "f", "test_vit", 32, TaskSchema((Task("coat", "multiclass", ("x", "y", "z")),)), seed=4)
    with pytest.raises(ValueError, match="one schema"):
        EnsembleMultiTaskModel.from_runs([tmp_path / "e", tmp_path / "f"])


def test_ensemble_probabilities_are_exact_means_numpy():
    # Independent of the models: mean_prob_logits inverts to the arithmetic mean of probabilities.
    rng = np.random.default_rng(0)
    member = [{k: torch.tensor(rng.normal(0, 3, (5, t.n_outputs)), dtype=torch.float32) for k, t in
               zip(SCHEMA.names, SCHEMA)} for _ in range(3)]
    p = to_probs(SCHEMA, models.mean_prob_logits(SCHEMA, member))
    for task in SCHEMA:
        want = torch.stack([to_probs(SCHEMA, m)[task.name] for m in member]).mean(0)
        assert torch.allclose(p[task.name], want, atol=1e-6)


def test_colour_statistics_match_the_baseline_features_on_the_tongue_region():
    """The in-network colour statistics are the baseline's RGB/HSV statistics of the non-black pixels."""
    import numpy as np

    from tongue_nb.model import features
    from tongue_nb.model.colour import colour_statistics, feature_names

    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.9, size=(2, 32, 32, 3)).astype(np.float32)
    img[0, :10] = 0.0  # blanked background: left out of the statistics
    mask = img.max(-1) > 4 / 255
    stats = colour_statistics(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
    names = feature_names()
    assert stats.shape == (2, len(names)) and np.isfinite(stats).all()
    values = np.concatenate([img, features._rgb_to_hsv(img)], -1).reshape(2, -1, 6)
    ref = features._masked_stats(values, mask.reshape(2, -1))  # [n, 6 channels, mean/std/percentiles]
    ours = stats[:, : 6 * ref.shape[2]].reshape(2, 6, -1)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # Lab lightness in [0, 1] (L / 100) agrees with the baseline's L / 100.
    lab = features._rgb_to_lab(img).reshape(2, -1, 3)
    l_mean = (lab[..., 0] * mask.reshape(2, -1)).sum(1) / mask.reshape(2, -1).sum(1) / 100
    np.testing.assert_allclose(stats[:, names.index("L_mean")], l_mean, atol=1e-3)
    # A black photo gives finite statistics, not NaN.
    assert torch.isfinite(colour_statistics(torch.zeros(1, 3, 16, 16))).all()


def test_colour_stats_heads_read_the_colour_embedding_and_round_trip():
    model = MultiTaskBackbone("test_convnext", SCHEMA, pretrained=False, image_size=32, colour_stats=True).eval()
    x = torch.rand(4, 3, 32, 32)
    out = model(x)
    assert all(torch.isfinite(v).all() for v in out.values())
    names = [g["name"] for g in model.param_groups(1e-3, 1e-3, 0.05)]
    assert names == ["head_decay", "head_no_decay"]  # frozen backbone; the colour embedding trains with the heads
    n_head = sum(p.numel() for g in model.param_groups(1e-3, 1e-3, 0.05) for p in g["params"])
    assert n_head > sum(p.numel() for p in model.heads.parameters())
    # A colour-only change of the image changes the logits through the statistics even with the heads only.
    brighter = model(x.clamp(0, 1) * 0.5)
    assert any(not torch.allclose(out[k], brighter[k]) for k in out)
