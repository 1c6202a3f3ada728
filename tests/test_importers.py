"""Tests of the TonguExpert importer: the real shared database and small hand-made layouts for errors."""
import csv
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tongue_nb import load_labels, load_schema
from tongue_nb.data.importers import DatasetImportError, import_tonguexpert

from conftest import SHARED_DATA

needs_real = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared TonguExpert data not at {SHARED_DATA}")

L1_COLS = {"coat_color": "labels_tai", "body_color": "labels_zhi", "fissure": "labels_fissure",
           "tooth_mark": "labels_tooth_mk"}
L2_COLS = {"coat_color": "tai_label", "body_color": "zhi_label", "fissure": "fissure_label",
           "tooth_mark": "tooth_mk_label", "coating": "coating_label"}


def _read_source(name: str) -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / "Phenotypes" / name, sep="\t", dtype=str, keep_default_na=False)


@needs_real
def test_predicted_labels_match_the_l2_file(tmp_path):
    out = import_tonguexpert(SHARED_DATA, tmp_path / "te", labels="predicted")
    labels = load_labels(out)  # every image and mask must resolve: on_problem="error"
    assert len(labels) == 4769 and labels.problems.empty
    ours = pd.read_csv(out / "labels.csv", dtype=str, keep_default_na=False)
    src = _read_source("L2_Labels_Predict.txt")
    assert load_schema(out / "tasks.yaml").names == list(L2_COLS)
    for task, col in L2_COLS.items():
        expected = src[col].replace("NaN", "none").value_counts().to_dict()
        assert ours[task].value_counts().to_dict() == expected, task
        assert "" not in set(ours[task])
    first = out / ours["image"].iloc[0]
    assert first.is_symlink() and first.resolve() == (SHARED_DATA / "TongueImage/Raw" / first.name).resolve()


@needs_real
def test_manual_labels_missing_exactly_where_l1_says_na(tmp_path):
    out = import_tonguexpert(SHARED_DATA, tmp_path / "te", labels="manual")
    labels = load_labels(out)
    assert len(labels) == 1371
    src = _read_source("L1_Labels_Manual.txt").set_index("SID")
    sids = [Path(p).stem for p in labels.table["image"]]
    for task, col in L1_COLS.items():
        task_def = labels.schema[task]
        na = (src.loc[sids, col] == "NA").to_numpy()
        assert ((labels.targets[task] == -1) == na).all(), task
        got = [task_def.labels[i] for i in labels.targets[task][~na]]
        assert got == list(src.loc[sids, col][~na]), task


def _fake_db(root: Path, rows: list[list[str]], header=("SID", "labels_tai", "labels_zhi", "labels_fissure",
                                                         "labels_tooth_mk"), images=None) -> Path:
    """A tiny TonguExpert-shaped folder with an L1 file and images for the SIDs given."""
    db = root / "TonguExpertDatabase"
    (db / "Phenotypes").mkdir(parents=True)
    (db / "TongueImage/Raw").mkdir(parents=True)
    (db / "TongueImage/Mask").mkdir(parents=True)
    with open(db / "Phenotypes/L1_Labels_Manual.txt", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    for sid in images if images is not None else [r[0] for r in rows]:
        Image.new("RGB", (16, 16), (200, 90, 100)).save(db / "TongueImage/Raw" / f"{sid}.jpg")
        Image.new("L", (16, 16), 255).save(db / "TongueImage/Mask" / f"{sid}.jpg")
    return db


def test_small_layout_imports_with_copy_and_parent_folder(tmp_path):
    _fake_db(tmp_path / "src", [["TE1", "white", "NA", "light", "NA"], ["TE2", "NA", "dark", "NA", "severe"]])
    out = import_tonguexpert(tmp_path / "src", tmp_path / "out", labels="manual", link="copy")
    img = out / "images/TE1.jpg"
    assert img.is_file() and not img.is_symlink()
    table = pd.read_csv(out / "labels.csv", dtype=str, keep_default_na=False)
    assert table.to_dict("records")[1] == {"image": "images/TE2.jpg", "mask": "masks/TE2.jpg", "coat_color": "",
                                          "body_color": "dark", "fissure": "", "tooth_mark": "severe"}
    # A second import into the same folder replaces the links instead of failing on them.
    import_tonguexpert(tmp_path / "src", tmp_path / "out", labels="manual")
    assert (out / "images/TE1.jpg").is_symlink()


def test_missing_database_and_label_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="database folder not found"):
        import_tonguexpert(tmp_path / "nope", tmp_path / "out")
    db = _fake_db(tmp_path / "src", [["TE1", "white", "NA", "light", "NA"]])
    with pytest.raises(FileNotFoundError, match="L2_Labels_Predict.txt"):
        import_tonguexpert(db, tmp_path / "out", labels="predicted")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetImportError, match="not a TonguExpert database"):
        import_tonguexpert(tmp_path / "empty", tmp_path / "out")


def test_unexpected_value_names_file_line_and_column(tmp_path):
    db = _fake_db(tmp_path / "src", [["TE1", "white", "NA", "light", "NA"], ["TE2", "white", "purple", "NA", "NA"]])
    with pytest.raises(DatasetImportError, match=r"L1_Labels_Manual.txt: line 3, column 'labels_zhi': "
                                                 r"unexpected value 'purple'"):
        import_tonguexpert(db, tmp_path / "out")


def test_manual_file_must_not_use_l2_nan(tmp_path):
    db = _fake_db(tmp_path / "src", [["TE1", "white", "NA", "NaN", "NA"]])
    with pytest.raises(DatasetImportError, match="line 2, column 'labels_fissure'.*'NaN'"):
        import_tonguexpert(db, tmp_path / "out")


def test_sids_without_images_are_listed(tmp_path):
    db = _fake_db(tmp_path / "src", [["TE1", "white", "NA", "NA", "NA"], ["TE2", "NA", "NA", "NA", "NA"],
                                     ["TE3", "NA", "NA", "NA", "NA"]], images=["TE2"])
    with pytest.raises(DatasetImportError, match="2 sample\\(s\\) have no image.*TE1, TE3"):
        import_tonguexpert(db, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_duplicate_sid_and_absent_column(tmp_path):
    db = _fake_db(tmp_path / "a", [["TE1", "white", "NA", "NA", "NA"], ["TE1", "NA", "NA", "NA", "NA"]])
    with pytest.raises(DatasetImportError, match="line 3: SID 'TE1' is listed twice"):
        import_tonguexpert(db, tmp_path / "out")
    db = _fake_db(tmp_path / "b", [["TE1", "white", "NA", "NA"]], header=("SID", "labels_tai", "labels_zhi",
                                                                          "labels_fissure"))
    with pytest.raises(DatasetImportError, match="labels_tooth_mk"):
        import_tonguexpert(db, tmp_path / "out")


def test_bad_options_and_output_inside_source(tmp_path):
    db = _fake_db(tmp_path / "src", [["TE1", "white", "NA", "NA", "NA"]])
    with pytest.raises(ValueError, match="labels must be one of"):
        import_tonguexpert(db, tmp_path / "out", labels="auto")
    with pytest.raises(ValueError, match="link must be one of"):
        import_tonguexpert(db, tmp_path / "out", link="hardlink")
    with pytest.raises(ValueError, match="inside the source database"):
        import_tonguexpert(db, db / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "labels.csv").write_text("image\n")
    with pytest.raises(ValueError, match="inside the dataset .*mine"):
        import_tonguexpert(db, tmp_path / "mine" / "te")
    assert not (tmp_path / "mine" / "te").exists()


def test_an_import_never_replaces_another_dataset_and_names_unreadable_label_files(tmp_path):
    """Importing into a folder that holds a dataset of the user's would replace its labels.csv and tasks.yaml;
    an earlier import (import.json) is imported again. A field over the csv module's limit and a column named twice
    are one-line errors naming the file."""
    from tongue_nb.data.importers import DatasetImportError
    from tongue_nb.data.synth import make_synthetic

    db = _fake_db(tmp_path / "src", [["TE1", "white", "NA", "NA", "NA"]])
    mine = make_synthetic(tmp_path / "mine", n=8, size=32, seed=0)
    before = (mine / "labels.csv").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a dataset \(labels\.csv, tasks\.yaml, images\)"):
        import_tonguexpert(db, mine)
    assert (mine / "labels.csv").read_bytes() == before
    out = import_tonguexpert(db, tmp_path / "te")
    assert import_tonguexpert(db, out) == out  # an earlier import is imported again
    big = _fake_db(tmp_path / "big", [["TE1", "w" * 200_000, "NA", "NA", "NA"]])
    with pytest.raises(DatasetImportError, match=r"L1_Labels_Manual\.txt: line \d+: not a readable tab-separated row"):
        import_tonguexpert(big, tmp_path / "te2")
    twice = _fake_db(tmp_path / "twice", [["TE1", "white", "NA", "NA", "NA", "NA"]],
                     header=("SID", "labels_tai", "labels_zhi", "labels_fissure", "labels_tooth_mk", "labels_tai"))
    with pytest.raises(DatasetImportError, match=r"\['labels_tai'\] appear twice"):
        import_tonguexpert(twice, tmp_path / "te3")
