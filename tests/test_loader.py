"""loader.py: batches, normalisation, seeded shuffling and augmentation, sharding, balanced sampling."""
import numpy as np
import pytest
import torch

from tongue_nb.data.loader import Augment, BatchLoader, augment_batch, class_balanced_weights
from tongue_nb.data.tasks import Task, TaskSchema

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _data(n=10, s=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # tag each row so a batch row can be traced back
    targets = {
        "coat": (np.arange(n) % 3).astype(np.int64),
        "shape": rng.integers(0, 2, (n, 3)).astype(np.float32),
    }
    targets["shape"][1, 2] = np.nan
    weights = np.linspace(0.5, 1.0, n).astype(np.float32)
    return images, targets, weights


def _loader(images, targets, weights, indices=None, **kw):
    kw.setdefault("batch_size", 4)
    indices = np.arange(len(images)) if indices is None else indices
    return BatchLoader(images, targets, weights, indices, mean=MEAN, std=STD, **kw)


def test_shapes_dtypes_and_alignment():
    images, targets, weights = _data()
    loader = _loader(images, targets, weights, indices=[7, 2, 5, 0, 9], batch_size=2)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    b = batches[0]
    assert b.x.dtype == torch.float32 and b.x.shape == (2, 3, 8, 8)
    assert b.targets["coat"].dtype == torch.int64 and b.targets["shape"].dtype == torch.float32
    assert b.weight.dtype == torch.float32 and b.index.dtype == torch.int64
    # without shuffle the order is the given one, sorted within each batch
    assert [bb.index.tolist() for bb in batches] == [[2, 7], [0, 5], [9]]
    for bb in batches:
        for j, i in enumerate(bb.index.tolist()):
            assert bb.targets["coat"][j] == targets["coat"][i]
            np.testing.assert_array_equal(bb.targets["shape"][j].numpy(), targets["shape"][i])
            assert bb.weight[j] == pytest.approx(weights[i])
            raw = bb.x[j, 0, 0, 0] * STD[0] + MEAN[0]
            assert raw * 255 == pytest.approx(i, abs=1e-3)


def test_normalisation_exact():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[1] = (255, 128, 0)
    loader = _loader(images, {}, None, batch_size=2)
    x = next(iter(loader)).x
    expect = torch.tensor([(v / 255 - m) / s for v, m, s in zip((255, 128, 0), MEAN, STD)])
    torch.testing.assert_close(x[1, :, 2, 2], expect)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-m / s for m, s in zip(MEAN, STD)]))
    assert next(iter(loader)).weight.tolist() == [1.0, 1.0]


def test_drop_last_and_len():
    images, targets, weights = _data(n=10)
    assert len(_loader(images, targets, weights, batch_size=4)) == 3
    loader = _loader(images, targets, weights, batch_size=4, drop_last=True)
    assert len(loader) == 2 and [len(b) for b in loader] == [4, 4]


def test_shuffle_seeded_per_epoch():
    images, targets, weights = _data(n=10)

    def order(seed, epoch):
        ld = _loader(images, targets, weights, shuffle=True, seed=seed)
        ld.set_epoch(epoch)
        return ld.epoch_order().tolist()

    assert sorted(order(0, 0)) == list(range(10))        # a permutation
    assert order(0, 0) == order(0, 0)                     # deterministic
    assert order(0, 0) != order(0, 1)                     # new order each epoch
    assert order(0, 1) != order(1, 0)                     # seed and epoch are not simply added
    assert order(3, 2) != list(range(10))


def test_augmentation_deterministic_for_seed():
    images, targets, weights = _data(n=6, s=16)

    def first_x(seed, epoch):
        ld = _loader(images, targets, weights, augment=True, seed=seed, prefetch=False)
        ld.set_epoch(epoch)
        return next(iter(ld)).x

    a, b = first_x(0, 0), first_x(0, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, first_x(0, 1))
    plain = next(iter(_loader(images, targets, weights, augment=False))).x
    assert not torch.equal(a, plain) and a.shape == plain.shape


def test_flip_only_is_exact_mirror():
    images, targets, weights = _data(n=4, s=8)
    aug = Augment(hflip=1.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0)
    x = next(iter(_loader(images, targets, weights, augment=aug))).x
    ref = next(iter(_loader(images, targets, weights))).x
    torch.testing.assert_close(x, ref.flip(3), rtol=0, atol=0)


def test_identity_affine_keeps_pixels_and_flip_via_affine_matches():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 3, 12, 12), generator=g) * 255
    ident = Augment(hflip=0.0, rotate=0.0, scale=(1.0, 1.000001), translate=0.0)  # goes through grid_sample
    torch.testing.assert_close(augment_batch(x.clone(), ident, g), x, atol=1e-2, rtol=0)
    flip = Augment(hflip=1.0, rotate=0.0, scale=(1.0, 1.000001), translate=0.0)
    torch.testing.assert_close(augment_batch(x.clone(), flip, g), x.flip(3), atol=1e-2, rtol=0)


def test_rotation_moves_content_but_keeps_centre():
    x = torch.zeros((1, 3, 33, 33))
    x[:, :, 16, :] = 255.0  # a horizontal line through the centre
    aug = Augment(hflip=0.0, rotate=10.0, scale=(1.0, 1.0), translate=0.0)
    g = torch.Generator().manual_seed(1)
    y = augment_batch(x, aug, g)
    assert y[0, 0, 16, 16] > 200           # centre stays on the line
    assert y[0, 0, 16, 1:4].max() < 200    # line ends moved off row 16


def test_brightness_contrast_off_by_default_and_bounded():
    assert Augment().brightness == 0.0 and Augment().contrast == 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.full((4, 3, 8, 8), 100.0)
    y = augment_batch(x, Augment(hflip=0, rotate=0, scale=(1, 1), translate=0, brightness=0.2), g)
    per = y.mean(dim=(1, 2, 3))
    assert ((per >= 80 - 1e-4) & (per <= 120 + 1e-4)).all() and not torch.allclose(per, per[0].expand(4))


def test_prefetch_gives_identical_batches_and_stops_early():
    images, targets, weights = _data(n=10, s=16)
    kw = dict(shuffle=True, augment=True, seed=5, batch_size=3)
    a = list(_loader(images, targets, weights, prefetch=True, **kw))
    b = list(_loader(images, targets, weights, prefetch=False, **kw))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        torch.testing.assert_close(x.x, y.x, rtol=0, atol=0)
        assert torch.equal(x.index, y.index)
    ld = _loader(images, targets, weights, prefetch=True, batch_size=1)
    for i, _ in enumerate(ld):
        if i == 1:
            break  # the producer thread must exit, not hang
    import threading
    assert not any(t.name == "tongue_nb-prefetch" for t in threading.enumerate())


def test_prefetch_propagates_errors():
    images, targets, weights = _data(n=6)
    ld = _loader(images, targets, weights, prefetch=True, batch_size=2)

    def boom(idx, gen=None):
        raise RuntimeError("gather failed")

    ld.make_batch = boom
    with pytest.raises(RuntimeError, match="gather failed"):
        list(ld)


@pytest.mark.parametrize("shuffle", [False, True])
def test_sharding_pads_and_covers(shuffle):
    images, targets, weights = _data(n=10)
    loaders = [_loader(images, targets, weights, batch_size=2, shuffle=shuffle, rank=r, world_size=3)
               for r in range(3)]
    orders = [ld.epoch_order() for ld in loaders]
    assert [len(o) for o in orders] == [4, 4, 4]
    assert [len(ld) for ld in loaders] == [2, 2, 2]
    together = np.concatenate(orders)
    assert set(together.tolist()) == set(range(10)) and len(together) == 12  # two padded repeats
    # ranks draw the same permutation: rank r's i-th sample is position i*3+r of it
    single = _loader(images, targets, weights, batch_size=2, shuffle=shuffle).epoch_order()
    padded = np.concatenate([single, single[:2]])
    for r in range(3):
        np.testing.assert_array_equal(orders[r], padded[r::3])


def test_sharding_bad_rank():
    images, targets, weights = _data()
    with pytest.raises(ValueError, match="rank < world_size"):
        _loader(images, targets, weights, rank=2, world_size=2)


def test_sampler_weights_with_replacement():
    images, targets, weights = _data(n=10)
    indices = np.arange(2, 10)
    sw = np.zeros(8)
    sw[[0, 5]] = [1.0, 3.0]  # only rows 2 and 7 can be drawn, 7 three times as often
    ld = _loader(images, targets, weights, indices=indices, sampler_weights=sw, batch_size=8)
    draws = []
    for epoch in range(200):
        ld.set_epoch(epoch)
        draws.append(ld.epoch_order())
    draws = np.concatenate(draws)
    assert len(ld.epoch_order()) == 8                  # epoch length = len(indices)
    assert set(draws.tolist()) == {2, 7}
    assert 0.70 < (draws == 7).mean() < 0.80


def test_bad_arguments():
    images, targets, weights = _data()
    with pytest.raises(ValueError, match=r"indices must be row numbers in \[0, 10\)"):
        _loader(images, targets, weights, indices=[0, 10])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _loader(images, targets, weights, batch_size=0)
    with pytest.raises(ValueError, match="sampler_weights needs one weight per entry"):
        _loader(images, targets, weights, sampler_weights=np.ones(3))
    with pytest.raises(ValueError, match="0..1 scale"):
        BatchLoader(images, targets, weights, [0], 2, (123.0, 116.0, 103.0), (58.0, 57.0, 57.0))
    with pytest.raises(ValueError, match=r"targets\['coat'\] has 3 rows"):
        _loader(images, {"coat": np.zeros(3, np.int64)}, weights)
    with pytest.raises(ValueError, match="Augment.rotate"):
        Augment(rotate=-1)


def test_class_balanced_weights():
    schema = TaskSchema((Task("coat", "multiclass", ("a", "b")), Task("spots", "binary", ("spots",))))
    targets = {
        "coat": np.array([0, 0, 0, 1, -1, -1], dtype=np.int64),
        "spots": np.array([[0], [0], [1], [0], [np.nan], [1]], dtype=np.float32),
    }
    w = class_balanced_weights(targets, schema, np.arange(6))
    assert w.shape == (6,)
    assert w[4] == 0.0                       # no label at all: never drawn
    assert w[3] > w[0]                       # rare coat class b outweighs class a
    assert w[5] > 0                          # coat missing: weighted by its spots label alone
    assert w[[0, 1, 2, 3, 5]].mean() == pytest.approx(1.0)
    # inverse frequency for one multiclass task: class b (1 of 4) weighs 3x class a (3 of 4)
    only = class_balanced_weights(targets, TaskSchema((schema["coat"],)), np.arange(4))
    assert only[3] / only[0] == pytest.approx(3.0)
    # balanced sampling really balances: expected class-b share 1/2
    assert only[3] / only.sum() == pytest.approx(0.5)


def test_a_cpu_device_gives_the_host_path_batch_for_batch():
    """device=cpu is the host path; the device branch builds the same batch where the device is."""
    import numpy as np
    import torch

    from tongue_nb.data.loader import Augment, BatchLoader

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 24, 24, 3), dtype=np.uint8)
    targets = {"coat": rng.integers(0, 3, 12)}
    kw = dict(shuffle=True, augment=Augment(), seed=3, prefetch=False)
    host = BatchLoader(images, targets, None, np.arange(12), 4, (0.5,) * 3, (0.25,) * 3, **kw)
    dev = BatchLoader(images, targets, None, np.arange(12), 4, (0.5,) * 3, (0.25,) * 3, device="cpu", **kw)
    assert dev.device is None
    for a, b in zip(host, dev):
        assert torch.equal(a.x, b.x) and torch.equal(a.targets["coat"], b.targets["coat"])
    # The device branch itself (gather uint8, move, convert, augment and normalise where the batch lives),
    # run with the CPU standing in for the device: the same batches.
    dev.device = torch.device("cpu")
    for a, b in zip(host, dev):
        assert torch.allclose(a.x, b.x, atol=1e-5) and torch.equal(a.weight, b.weight)
