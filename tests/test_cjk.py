"""Chinese task and class names in figures: matplotlib falls back to a Regular CJK face, no glyph is missing.

The sweep whose dataset is named in Chinese, its pages read in Chromium, is tests/test_pages.py's.
"""
from __future__ import annotations

import io
import warnings

import pytest
from matplotlib import font_manager, ft2font, rc_context
from matplotlib.figure import Figure

from tongue_nb import fonts

TEXT = "白苔 舌形 齿痕 裂纹"
pytestmark = pytest.mark.skipif(fonts.collection_path() is None, reason="manimgx-fonts-cjk not installed")


@pytest.fixture()
def regular(tmp_path, monkeypatch):
    """A Regular face of a few characters built from the collection (the whole face takes minutes), chosen as
    if it were the cached one; matplotlib's font list and settings are put back afterwards."""
    path = fonts.build_regular(tmp_path / "sc.otf", unicodes=[ord(c) for c in TEXT + "ab"])
    monkeypatch.setattr(fonts, "regular_path", lambda cache_dir=None: path)
    monkeypatch.setattr(fonts, "_known_static", lambda: None)
    monkeypatch.setattr(fonts, "_chosen", None)
    # a face of the same family registered earlier in this process (the real built one, by any module that
    # drew a figure) would win over this one: left out here, put back afterwards
    monkeypatch.setattr(font_manager.fontManager, "ttflist",
                        [f for f in font_manager.fontManager.ttflist if f.name != fonts.FAMILY])
    font_manager.fontManager._findfont_cached.cache_clear()
    with rc_context():
        yield path
    font_manager.fontManager._findfont_cached.cache_clear()


def test_a_chinese_title_draws_every_glyph_in_a_regular_face(regular):
    family = fonts.use_cjk_fonts()
    assert family == "Noto Sans CJK SC"
    found = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert found == str(regular)
    face = font_manager.ttfFontProperty(ft2font.FT2Font(found))
    assert face.weight == 400 and face.style == "normal"
    fig = Figure(figsize=(3, 1))
    fig.suptitle(f"coat: {TEXT}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]


def test_without_the_built_face_the_variable_one_is_used_without_a_warning_per_text(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fonts, "regular_path", lambda cache_dir=None: tmp_path / "absent.otf")
    monkeypatch.setattr(fonts, "_known_static", lambda: None)
    monkeypatch.setattr(fonts, "_chosen", None)
    # a face of the same family registered earlier in this process (the real built one, by any module that
    # drew a figure) would win over this one: left out here, put back afterwards
    monkeypatch.setattr(font_manager.fontManager, "ttflist",
                        [f for f in font_manager.fontManager.ttflist if f.name != fonts.FAMILY])
    font_manager.fontManager._findfont_cached.cache_clear()
    with rc_context():
        family = fonts.use_cjk_fonts()
        fig = Figure(figsize=(3, 1))
        fig.suptitle(TEXT)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(io.BytesIO(), format="png")
    font_manager.fontManager._findfont_cached.cache_clear()
    assert family == "Noto Sans CJK SC" and "Thin weight" in caplog.text
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert "Failed to find font weight" not in caplog.text
