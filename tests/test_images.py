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


def test_mask_threshold_is_strictly_above_127(tmp_path):
    m = np.array([[127, 128, 0, 255]], dtype=np.uint8)
    Image.fromarray(m, "L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[False, True, False, True]])


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
