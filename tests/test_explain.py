"""Class-activation maps (tongue_nb.analysis.explain): the map is the evidence the head reads, for CNNs and transformers."""
import numpy as np
import pytest


def test_grad_cam_maps_the_feature_the_head_reads(tmp_path):
    """With a head that reads one feature channel, Grad-CAM is that channel's activation map."""
    import torch
    import torch.nn.functional as F

    from tongue_nb.analysis.explain import class_activation_maps, overlay, target_layer
    from tongue_nb.model.backbones import MultiTaskBackbone
    from tongue_nb.data.tasks import default_schema

    torch.manual_seed(0)
    model = MultiTaskBackbone("resnet18", default_schema(), pretrained=False, freeze_backbone=True, image_size=64)
    head = model.heads["coat"][1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 7] = 1.0  # class 1 = channel 7 of the pooled features
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    cams = class_activation_maps(model, images, "coat", [1, 1], model.mean, model.std)
    layer, _ = target_layer(model)
    acts = []
    hook = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(model.mean).view(1, 3, 1, 1)) \
        / torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        model(x)
    hook.remove()
    want = F.interpolate(acts[0][:, 7:8].clamp(min=0), size=(64, 64), mode="bilinear").squeeze(1).numpy()
    for got, ref in zip(cams, want):
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.98
    # another class reads no channel: its map differs (it is flat)
    other = class_activation_maps(model, images, "coat", [0, 0], model.mean, model.std)
    assert not np.allclose(other, cams)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # left as it was (frozen)
    assert overlay(images[0], cams[0]).shape == (64, 64, 3)


@pytest.mark.parametrize("backbone,size", [("test_vit", 32), ("convnext_atto", 32), ("tf_efficientnet_lite0", 32)])
def test_grad_cam_works_for_cnn_and_transformer_backbones(backbone, size):
    from tongue_nb.analysis.explain import class_activation_maps
    from tongue_nb.model.backbones import MultiTaskBackbone
    from tongue_nb.data.tasks import default_schema

    model = MultiTaskBackbone(backbone, default_schema(), pretrained=False, image_size=size)
    images = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    cams = class_activation_maps(model, images, "shape", [0, 1, 2], model.mean, model.std)
    assert cams.shape == (3, size, size) and np.isfinite(cams).all() and cams.max() <= 1.0 + 1e-6

