"""images.py: safe decoding of every awkward input, mask thresholding, crop geometry."""
import warnings

import numpy as np
import pytest
from PIL import Image

from tongue_nb.data.images import (EmptyMaskWarning, ImageError, mask_box, prepare_image, read_image, read_mask,
                              square_box)


def _rgb(h=24, w=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------- bad input: each case names the file and the reason ----------

def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"image file not found: .*nope\.jpg"):
        read_image(p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\): .*empty\.jpg"):
        read_image(p)


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "full.jpg"
    Image.fromarray(_rgb(64, 64)).save(p, quality=95)
    data = p.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg is truncated"):
        read_image(cut)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is a text file, not a photograph\n" * 10)
    with pytest.raises(ImageError, match=r"notes\.jpg is not an image"):
        read_image(p)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(_rgb(40, 50)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2000 px image: above the limit, below 2x
    with pytest.raises(ImageError, match=r"big\.png is too large: 50x40 = 2000 pixels.*MAX_IMAGE_PIXELS=1000"):
        read_image(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # far above: Pillow's own error, still ours
    with pytest.raises(ImageError, match=r"big\.png is too large"):
        read_image(p)


# ---------- modes ----------

def test_rgb_roundtrip_png(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, a)


def test_grey_to_rgb(tmp_path):
    g = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[..., :3] = 200
    a[:, :4, 3] = 255  # left half opaque
    a[:, 4:, 3] = 0    # right half transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert (out[:, :4] == 200).all() and (out[:, 4:] == 0).all()


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 1
    img.save(tmp_path / "p.png", transparency=1)
    out = read_image(tmp_path / "p.png")
    assert (out == 0).all()  # red but fully transparent -> black


def test_16bit_grey_scaled_not_clipped(tmp_path):
    g = np.array([[0, 257 * 100, 65535, 30000]], dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, round(30000 / 257)])


def test_float_image_0_1(tmp_path):
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tiff")
    out = read_image(tmp_path / "f.tiff")
    np.testing.assert_array_equal(out[0, :, 1], [0, 128, 255])


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (12, 16, 3)
    r, g, b = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_applied(tmp_path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)  # wide image, bright block at the left end
    a[:, :10] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)  # displayed as portrait
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # left end is now on top


# ---------- masks ----------

def test_mask_threshold_jpeg(tmp_path):
    m = np.zeros((32, 32), dtype=np.uint8)
    m[8:24, 4:20] = 255
    Image.fromarray(m, "L").save(tmp_path / "m.jpg", quality=75)  # JPEG ringing: not pure 0/255
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2
    out = read_mask(tmp_path / "m.jpg", (32, 32))
    assert out.dtype == bool
    assert mask_box(out) == (8, 24, 4, 20)


def _tongue(h=40, w=48) -> np.ndarray:
    """A bool tongue shape (an ellipse) that touches no image edge."""
    y, x = np.mgrid[:h, :w]
    return ((y - 20) / 14.0) ** 2 + ((x - 24) / 18.0) ** 2 <= 1.0


def _save_mask(form: str, truth: np.ndarray, path):
    """Write `truth` the way an annotation tool would store it in the given form; returns the file."""
    if form == "L-0-255":
        Image.fromarray(truth.astype(np.uint8) * 255, "L").save(path.with_suffix(".png"))
    elif form == "L-0-1":
        Image.fromarray(truth.astype(np.uint8), "L").save(path.with_suffix(".png"))
    elif form in ("P-2-entries", "P-black-red"):
        img = Image.fromarray(truth.astype(np.uint8), "P")
        img.putpalette([0, 0, 0, 255, 255, 255] if form == "P-2-entries" else [0, 0, 0, 200, 0, 0])
        img.save(path.with_suffix(".png"))
    elif form in ("I16-0-1", "I16-0-65535"):
        scale = 1 if form == "I16-0-1" else 65535
        Image.fromarray(truth.astype(np.uint16) * scale).save(path.with_suffix(".png"))
    elif form == "L-jpeg-noise":
        Image.fromarray(truth.astype(np.uint8) * 255, "L").save(path.with_suffix(".jpg"), quality=90)
    elif form == "RGB-red":
        rgb = np.zeros(truth.shape + (3,), np.uint8)
        rgb[truth] = (220, 30, 40)
        Image.fromarray(rgb).save(path.with_suffix(".png"))
    elif form == "1-bit":
        Image.fromarray(truth).save(path.with_suffix(".png"))
    return next(path.parent.glob(path.name + ".*"))


MASK_FORMS = ["L-0-255", "L-0-1", "P-2-entries", "P-black-red", "I16-0-1", "I16-0-65535", "L-jpeg-noise", "RGB-red",
              "1-bit"]


@pytest.mark.parametrize("form", MASK_FORMS)
def test_every_mask_storage_form_is_read_by_meaning(tmp_path, form):
    # Issue 30: a label map with tongue = 1 (not 255) was read as an empty mask, and the photo trained uncropped.
    truth = _tongue()
    file = _save_mask(form, truth, tmp_path / "m")
    stored = Image.open(file)
    if form == "I16-0-1":
        assert stored.mode.startswith("I") and np.asarray(stored).max() == 1  # really a 16-bit 0/1 file
    if form == "L-jpeg-noise":
        assert len(np.unique(np.asarray(stored))) > 2  # JPEG noise: values near 0 and near 255, not pure
    if form == "P-2-entries":
        assert stored.mode == "P" and len(stored.getpalette()) // 3 == 2
    out = read_mask(file, truth.shape)
    assert out.dtype == bool and out.shape == truth.shape
    if form == "L-jpeg-noise":
        assert (out != truth).mean() < 0.01
    else:
        np.testing.assert_array_equal(out, truth)


def test_a_mask_with_a_soft_edge_is_split_at_the_middle_of_its_range(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = 255
    m[4, 5:15], m[15, 5:15] = 128, 127  # anti-aliased rows: a few pixels between the two ends
    Image.fromarray(m, "L").save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out[4, 5:15].all() and not out[15, 5:15].any() and mask_box(out) == (4, 15, 5, 15)


def test_empty_and_full_masks(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "full.png")
    assert not read_mask(tmp_path / "empty.png").any()
    assert read_mask(tmp_path / "full.png").all()


def test_a_0_1_label_map_stored_as_jpeg_is_read_by_meaning(tmp_path):
    """A 0/1 map saved as JPEG (values 0, 1 and a little noise) was read against 0/255 ends: an empty mask, and the
    photo trained uncropped."""
    truth = _tongue()
    Image.fromarray(truth.astype(np.uint8), "L").save(tmp_path / "m.jpg", quality=95)
    out = read_mask(tmp_path / "m.jpg", truth.shape)
    assert (out != truth).mean() < 0.05 and out.sum() > 0.8 * truth.sum()  # JPEG's blocks move a few edge pixels


def test_a_0_1_label_map_with_a_few_void_pixels_is_ambiguous(tmp_path):
    """0 background, 1 tongue and a row of 255 ("void"): read by its ends, only the 255 pixels were tongue."""
    m = _tongue().astype(np.uint8)
    m[0, :] = 255
    Image.fromarray(m, "L").save(tmp_path / "void.png")
    with pytest.raises(ImageError, match=r"void\.png is ambiguous: 3 different values \(0, 1, 255\)"):
        read_mask(tmp_path / "void.png")


@pytest.mark.parametrize("values", [[0, 1, 2], [0, 85, 170, 255]])
def test_an_ambiguous_many_valued_mask_is_an_error_naming_the_file(tmp_path, values):
    # A label map of three classes, or a grey picture: which pixels are tongue cannot be told.
    m = np.resize(np.repeat(np.asarray(values, np.uint8), 16), (16, 16))
    Image.fromarray(m, "L").save(tmp_path / "labels_map.png")
    with pytest.raises(ImageError, match=r"mask .*labels_map\.png is ambiguous: \d+ different values \(0, "):
        read_mask(tmp_path / "labels_map.png")


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageError, match=r"m\.png is 20x10 .* its image is 40x30"):
        read_mask(tmp_path / "m.png", (30, 40))


def test_rgb_mask(tmp_path):
    m = np.zeros((6, 6, 3), dtype=np.uint8)
    m[2:4, 2:4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert mask_box(read_mask(tmp_path / "m.png")) == (2, 4, 2, 4)


# ---------- crop geometry ----------

def _marked_image():
    """100 x 200 (H x W) image: grey background, a white tongue box rows 20..60, cols 50..130."""
    img = np.full((100, 200, 3), 80, dtype=np.uint8)
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 50:130] = True
    img[mask] = 255
    return img, mask


def test_square_box_geometry():
    # box 40 high x 80 wide, margin 0.1 -> 48 x 96 -> square 96 centred on (40, 90)
    assert square_box((20, 60, 50, 130), 0.1) == (-8, 88, 42, 138)
    assert square_box((0, 10, 0, 10), 0.0) == (0, 10, 0, 10)


def test_crop_to_box_with_margin():
    img, mask = _marked_image()
    out = prepare_image(img, mask, 96, "crop", margin=0.1)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    # crop is 96 px square = scale 1: tongue spans cols 8..88, rows 28..68; above row -8 .. 0 is padding
    assert out[30:66, 10:86].min() == 255
    assert (out[0:6] == 0).all()            # rows -8..-2 of the source are outside: black padding
    assert (out[70:86, 2:6] == 80).all()    # background kept (not blanked) in "crop"


def test_crop_blank_sets_background_to_zero():
    img, mask = _marked_image()
    out = prepare_image(img, mask, 96, "crop_blank", margin=0.1)
    assert out[30:66, 10:86].min() == 255
    assert out[70:90, 0:6].max() == 0


def test_blank_without_crop_keeps_whole_frame():
    img, mask = _marked_image()
    out = prepare_image(img, mask, 100, "blank")
    # whole 200x100 image letterboxed into 200x200 (50 rows above), resized by 1/2:
    # the frame is rows 25..75, the tongue rows 35..55, cols 25..65
    assert out[37:53, 27:63].min() == 255
    assert out[58:70, 80:98].max() == 0      # blanked background inside the frame
    assert out[0:24].max() == 0              # letterbox padding above
    ref = prepare_image(img, None, 100, "none")
    assert (ref[58:70, 80:98] == 80).all()  # same place without blanking is the grey background


def test_no_mask_pads_to_square_without_distortion():
    img = np.full((50, 100, 3), 255, dtype=np.uint8)
    out = prepare_image(img, None, 50, "crop")
    assert (out[:10] == 0).all() and (out[-10:] == 0).all()
    assert out[15:35].min() == 255


def test_empty_mask_falls_back_and_warns():
    img, _ = _marked_image()
    empty = np.zeros(img.shape[:2], dtype=bool)
    with pytest.warns(EmptyMaskWarning):
        out = prepare_image(img, empty, 50, "crop_blank")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = prepare_image(img, None, 50, "crop_blank")
    np.testing.assert_array_equal(out, ref)
    assert out.max() == 255  # not blanked to black


def test_prepare_rejects_bad_arguments():
    img, mask = _marked_image()
    with pytest.raises(ValueError, match="crop must be one of"):
        prepare_image(img, mask, 32, "zoom")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        prepare_image(img, mask, 0)
    with pytest.raises(ValueError, match="mask shape"):
        prepare_image(img, mask[:10], 32)


# ---------- the one photo-and-mask reader ----------

def _photo_and_masks(tmp_path):
    """A photo with a bright tongue, its mask as 0/255 and as 0/1, and an all-black mask."""
    truth = _tongue()
    img = np.full(truth.shape + (3,), 60, np.uint8)
    img[truth] = (210, 90, 90)
    Image.fromarray(img).save(tmp_path / "p.png")
    _save_mask("L-0-255", truth, tmp_path / "m255")
    _save_mask("L-0-1", truth, tmp_path / "m01")
    Image.fromarray(np.zeros(truth.shape, np.uint8)).save(tmp_path / "empty.png")
    return tmp_path


def test_read_sample_reads_a_label_map_like_a_black_and_white_mask(tmp_path):
    from tongue_nb.data.images import read_sample
    root = _photo_and_masks(tmp_path)
    settings = [(16, "crop", 0.1), (24, "crop_blank", 0.0), (16, "none", 0.1)]
    white = read_sample("p.png", "m255.png", settings, root=root)
    ones = read_sample("p.png", "m01.png", settings, root=root)
    assert not white.empty_mask and not ones.empty_mask
    for a, b in zip(white.pixels, ones.pixels):
        np.testing.assert_array_equal(a, b)
    img = read_image(root / "p.png")
    np.testing.assert_array_equal(white.pixels[0], prepare_image(img, _tongue(), 16, "crop", 0.1))


def test_read_sample_policies_for_an_empty_mask_a_small_photo_and_a_segmenter(tmp_path):
    from tongue_nb.data.images import read_sample
    root = _photo_and_masks(tmp_path)
    crop = [(16, "crop", 0.1)]
    whole = read_sample("p.png", "empty.png", crop, root=root)  # training: the whole photo, recorded
    assert whole.empty_mask
    np.testing.assert_array_equal(whole.pixels[0], read_sample("p.png", None, crop, root=root).pixels[0])
    with pytest.raises(ImageError, match=r"empty\.png: the mask is empty"):  # prediction: no uncropped answer
        read_sample("p.png", "empty.png", crop, root=root, empty_mask="error")
    with pytest.raises(ImageError, match=r"p\.png: 48x40 px is too small \(at least 64 px a side\)"):
        read_sample("p.png", "", crop, root=root, min_side=64)
    found = read_sample("p.png", "", crop, root=root, segment=lambda img: _tongue())
    np.testing.assert_array_equal(found.pixels[0], read_sample("p.png", "m255.png", crop, root=root).pixels[0])
    with pytest.raises(ImageError, match=r"p\.png: no tongue found by the segmenter"):
        read_sample("p.png", "", crop, root=root, segment=lambda img: None)
    with pytest.raises(ValueError, match="empty_mask must be one of whole, error"):
        read_sample("p.png", "", crop, root=root, empty_mask="skip")
