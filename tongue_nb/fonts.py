"""Chinese, Japanese and Korean text in figures: a CJK font that matplotlib falls back to after its Latin one.

`use_cjk_fonts()` is the one place that sets matplotlib's fonts; every module that draws a figure calls it
when imported (it is idempotent and cheap). Latin text stays in matplotlib's sans-serif font (DejaVu Sans);
characters that font lacks come from the first of:

1. a static Regular CJK font matplotlib already knows (e.g. Debian's fonts-noto-cjk);
2. the Regular (weight 400) Simplified Chinese face built once from the variable Noto Sans CJK collection of
   the `manimgx-fonts-cjk` package, kept beside matplotlib's own font list (`<matplotlib cache>/tongue_nb/`,
   ~/.cache/matplotlib unless $MPLCONFIGDIR says otherwise): it depends on no dataset, so every image-cache
   folder ($TONGUE_NB_CACHE) shares it. `python -m tongue_nb.fonts` builds it (the Makefile's set-up does);
3. that collection's variable face as it is, whose default weight is Thin, with a logged reason.

matplotlib cannot choose a variable font's weight, so the Regular face is made here: its CFF2 outlines
evaluated at weight 400 (each `blend` replaced by its value there), the other tables by fontTools' instancer.
The collection's Japanese and Korean kana and hangul are in the Simplified Chinese face too.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import sys
import time
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

FAMILY = "Noto Sans CJK SC"
STATIC_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Source Han Sans SC",
                   "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Droid Sans Fallback")
SC_FACE = 2          # the collection's faces: JP, KR, SC, TC, HK
WEIGHT = 400
FONT_VERSION = 1     # bump when the built file would differ
# The pages' CSS: after a page's Latin fonts, CJK fonts a reader's system may have (Linux, macOS, Windows)
CSS_CJK = ('"Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Hiragino Sans GB","Microsoft YaHei",'
           '"WenQuanYi Micro Hei"')
_chosen: str | None = None


def collection_path() -> Path | None:
    """The variable Noto Sans CJK collection of the manimgx-fonts-cjk package, or None where it is missing."""
    try:
        import manimgx_fonts_cjk
    except ImportError:
        return None
    path = Path(manimgx_fonts_cjk.__file__).with_name("NotoSansCJK-VF.otf.ttc")
    return path if path.is_file() else None


def regular_path(cache_dir: str | Path | None = None) -> Path:
    """Where the built Regular face is kept: <matplotlib cache>/tongue_nb/NotoSansCJKsc-Regular-v<version>.otf."""
    import matplotlib

    root = Path(cache_dir) if cache_dir is not None else Path(matplotlib.get_cachedir()) / "tongue_nb"
    return root / f"NotoSansCJKsc-Regular-v{FONT_VERSION}.otf"


def _scalars(font, location: dict[str, float]) -> list[list[float]]:
    """For each of the CFF2 variation store's data sets, each region's weight at the (user) location."""
    from fontTools.varLib.models import normalizeLocation, piecewiseLinearMap, supportScalar

    axes = {a.axisTag: (a.minValue, a.defaultValue, a.maxValue) for a in font["fvar"].axes}
    loc = normalizeLocation(location, axes)
    if "avar" in font:
        loc = {tag: piecewiseLinearMap(v, font["avar"].segments.get(tag, {})) for tag, v in loc.items()}
    store = font["CFF2"].cff.topDictIndex[0].VarStore.otVarStore
    tags = [a.axisTag for a in font["fvar"].axes]
    regions = store.VarRegionList.Region
    out = []
    for data in store.VarData:
        row = []
        for r in data.VarRegionIndex:
            support = {t: (a.StartCoord, a.PeakCoord, a.EndCoord) for t, a in zip(tags, regions[r].VarRegionAxis)}
            row.append(supportScalar(loc, support))
        out.append(row)
    return out


def _flatten(program: list, scalars: list[list[float]]) -> list:
    """A CFF2 charstring program with each `blend` replaced by its values at the location, `vsindex` dropped."""
    out: list = []
    vsindex = 0
    for token in program:
        if token == "blend":
            n, weights = out.pop(), scalars[vsindex]
            k = len(weights)
            args = out[-n * (k + 1):]
            del out[-n * (k + 1):]
            for i in range(n):
                deltas = args[n + i * k: n + (i + 1) * k]
                out.append(round(args[i] + sum(d * w for d, w in zip(deltas, weights))))
        elif token == "vsindex":
            vsindex = out.pop()
        else:
            out.append(token)
    return out


def _static_cff2(font, location: dict[str, float]) -> None:
    """The font's CFF2 outlines evaluated at the location, without their variation store (in place)."""
    scalars = _scalars(font, location)
    cff = font["CFF2"].cff
    top = cff.topDictIndex[0]
    charstrings = [top.CharStrings[name] for name in font.getGlyphOrder()] + list(cff.GlobalSubrs)
    for fd in top.FDArray:
        charstrings += list(getattr(fd.Private, "Subrs", None) or [])
    for cs in charstrings:
        cs.decompile()
        cs.program = _flatten(cs.program, scalars)
    del top.VarStore
    for fd in top.FDArray:
        fd.Private.vstore = None


def build_regular(out: str | Path, source: str | Path | None = None, face: int = SC_FACE,
                  unicodes: Iterable[int] | None = None) -> Path:
    """The collection's `face` at weight 400 as a static OpenType font at `out` (written atomically).

    `unicodes` keeps only those characters (a quick build, for tests); None keeps the whole face.
    """
    from fontTools import subset
    from fontTools.ttLib import TTFont
    from fontTools.varLib import instancer

    from tongue_nb.runio import atomic_write_bytes

    font = TTFont(str(source or collection_path()), fontNumber=face)
    if unicodes is not None:
        opts = subset.Options(layout_features=["*"], name_IDs=["*"], notdef_outline=True, glyph_names=False)
        sub = subset.Subsetter(opts)
        sub.populate(unicodes=list(unicodes))
        sub.subset(font)
    _static_cff2(font, {"wght": WEIGHT})
    outlines = font["CFF2"]
    del font["CFF2"]  # the instancer would redo the outlines, minutes slower; it does the other tables
    instancer.instantiateVariableFont(font, {"wght": WEIGHT}, inplace=True)
    font["CFF2"] = outlines
    family = font["name"].getDebugName(16) or font["name"].getDebugName(1)
    names = {1: family, 2: "Regular", 4: f"{family} Regular", 6: f"{family.replace(' ', '')}-Regular"}
    font["name"].names = [n for n in font["name"].names if n.nameID not in (16, 17, 21, 22)]
    for name_id, text in names.items():
        font["name"].setName(text, name_id, 3, 1, 0x409)
        font["name"].setName(text, name_id, 1, 0, 0)
    font["OS/2"].usWeightClass = WEIGHT
    buf = io.BytesIO()
    font.save(buf)
    return atomic_write_bytes(out, buf.getvalue())


def ensure_regular(cache_dir: str | Path | None = None) -> Path:
    """The built Regular face in the cache folder, built now (under a lock, once) where it is missing."""
    from tongue_nb.data.cache import file_lock

    path = regular_path(cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        if not path.is_file():
            start = time.perf_counter()
            build_regular(path)
            log.info("built %s (%.1f MB) in %.0f s", path, path.stat().st_size / 1e6, time.perf_counter() - start)
    return path


def _known_static() -> str | None:
    """A CJK family at weight 400 that matplotlib already knows (a system font), or None."""
    from matplotlib import font_manager

    known = {(f.name, f.weight) for f in font_manager.fontManager.ttflist}
    return next((name for name in STATIC_FAMILIES if (name, 400) in known or (name, "normal") in known), None)


def _register(path: Path) -> str:
    from matplotlib import font_manager

    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


def _choose() -> str | None:
    """The CJK family to fall back to, registering the font file where needed; None where there is none."""
    family = _known_static()
    if family:
        return family
    regular = regular_path()
    if regular.is_file():
        try:
            return _register(regular)
        except (OSError, RuntimeError) as exc:
            log.warning("the built CJK font %s could not be read (%s); using the variable one", regular, exc)
    source = collection_path()
    if source is None:
        log.warning("no CJK font: Chinese, Japanese and Korean names are drawn as boxes; "
                    "pip install manimgx-fonts-cjk (part of tongue_nb's dependencies)")
        return None
    log.warning("Chinese, Japanese and Korean text is drawn in the Thin weight of the variable Noto Sans CJK: "
                "the Regular face is not built yet (python -m tongue_nb.fonts builds it into %s)", regular.parent)
    from matplotlib import font_manager, ft2font

    entry = font_manager.ttfFontProperty(ft2font.FT2Font(str(source), face_index=SC_FACE))
    # listed as weight 400, the weight asked for, so that matplotlib does not warn on every text of every figure
    font_manager.fontManager.ttflist.append(dataclasses.replace(entry, weight=WEIGHT))
    font_manager.fontManager._findfont_cached.cache_clear()  # what addfont does after adding
    return entry.name


def use_cjk_fonts() -> str | None:
    """matplotlib's text falls back to a CJK font after its sans-serif font; the CJK family's name.

    Called when each figure-drawing module is imported; the choice is made once per process.
    """
    global _chosen
    import matplotlib

    if _chosen is None:
        _chosen = _choose() or ""
    if _chosen:
        families = [f for f in matplotlib.rcParams["font.family"] if f != _chosen]
        matplotlib.rcParams["font.family"] = families + [_chosen]
    return _chosen or None


def main(argv: list[str] | None = None) -> int:
    """`python -m tongue_nb.fonts [FOLDER]`: build the Regular CJK face (once) and say where it is."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if collection_path() is None:
        print("manimgx-fonts-cjk is not installed: no CJK font to build", file=sys.stderr)
        return 1
    start = time.perf_counter()
    path = ensure_regular(args[0] if args else None)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB; {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
