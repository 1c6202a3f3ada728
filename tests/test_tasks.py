"""Task schema and labels table: every rule and every bad-input case with the error it gets."""
import numpy as np
import pytest

from tongue_nb.data.labels import LabelError, load_labels
from tongue_nb.data.tasks import (SchemaError, Task, TaskSchema, apply_task_weights, default_schema, load_schema,
                                  parse_task_weights)


def write(folder, csv_text, schema=None, images=()):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text(csv_text)
    (schema or default_schema()).to_yaml(folder / "tasks.yaml")
    for name in images:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    return folder


def test_default_schema_roundtrip(tmp_path):
    schema = default_schema()
    assert schema.names == ["shape", "coat"]
    assert schema["shape"].n_outputs == 3 and schema["coat"].kind == "multiclass"
    again = load_schema(schema.to_yaml(tmp_path / "tasks.yaml"))
    assert again == schema


@pytest.mark.parametrize("entry, message", [
    ({"name": "coat", "kind": "multiclass", "labels": ["a", "a"]}, "task 'coat': label 'a' is named twice"),
    ({"name": "coat", "kind": "multiclass", "labels": []}, "task 'coat': the label list is empty"),
    ({"name": "coat", "kind": "ordinal", "labels": ["a", "b"]}, "task 'coat': unknown kind 'ordinal'"),
    ({"name": "coat", "kind": "multiclass", "labels": ["a"]}, "task 'coat': a multiclass task needs at least two"),
    ({"name": "coat", "kind": "binary", "labels": ["a", "b"]}, "task 'coat': a binary task has exactly one label"),
    ({"name": "coat", "kind": "multiclass", "labels": ["a", "b"], "weight": -1}, "task 'coat': weight must be"),
    ({"name": "coat", "kind": "multiclass", "labels": ["a", "b"], "colour": 1}, "task 'coat': unknown key"),
])
def test_bad_schema_names_the_task(tmp_path, entry, message):
    import yaml
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [entry]}))
    with pytest.raises(SchemaError, match=message):
        load_schema(path)


def test_a_key_given_twice_in_tasks_yaml_is_refused(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n- name: coat\n  kind: multiclass\n  labels: [a, b]\n  weight: 2\n  weight: 0.5\n")
    with pytest.raises(SchemaError, match=r"tasks.yaml: not valid YAML.*key 'weight' is given twice.*lines 5 and 6"):
        load_schema(path)


def test_duplicate_task_names_refused():
    with pytest.raises(SchemaError, match="repeated: coat"):
        TaskSchema((Task("coat", "binary", ("x",)), Task("coat", "binary", ("y",))))


def test_combined_score_weights_and_missing_tasks():
    schema = TaskSchema((Task("a", "binary", ("a",), 1.0), Task("b", "binary", ("b",), 3.0)))
    assert schema.combined_score({"a": 0.2, "b": 0.6}) == pytest.approx(0.5)
    assert schema.combined_score({"a": 0.2, "b": None}) == pytest.approx(0.2)


def test_labels_parse_all_kinds_and_missing(tmp_path):
    schema = TaskSchema((
        Task("shape", "multilabel", ("spots", "cracks", "teethmarks"), 0.5),
        Task("coat", "multiclass", ("greasy", "rotten", "nospecialgreasy"), 0.5),
        Task("fissure", "binary", ("fissure",)),
    ))
    csv = ("image,mask,group,split,weight,shape,coat,fissure\n"
           "a.png,,p1,train,1.0,spots;cracks,greasy,yes\n"
           "b.png,,p1,,0.5,none,,0\n"
           "c.png,,,test,,,Rotten,\n")
    folder = write(tmp_path / "d", csv, schema, images=["a.png", "b.png", "c.png"])
    labels = load_labels(folder, schema)
    assert list(labels.table["group"]) == ["p1", "p1", "c.png"]
    assert list(labels.table["split"]) == ["train", "", "test"]
    assert labels.table["weight"].tolist() == [1.0, 0.5, 1.0]
    np.testing.assert_array_equal(labels.targets["shape"][:2], [[1, 1, 0], [0, 0, 0]])
    assert np.isnan(labels.targets["shape"][2]).all()  # empty cell = missing, not "none"
    assert labels.targets["coat"].tolist() == [0, -1, 1]
    assert labels.targets["fissure"][:2, 0].tolist() == [1.0, 0.0] and np.isnan(labels.targets["fissure"][2, 0])
    assert labels.labelled_counts() == {"shape": 2, "coat": 2, "fissure": 2}


def test_one_column_per_label(tmp_path):
    csv = "image,shape.spots,shape.cracks,shape.teethmarks,coat\na.png,1,0,,greasy\n"
    labels = load_labels(write(tmp_path / "d", csv, images=["a.png"]))
    row = labels.targets["shape"][0]
    assert row[:2].tolist() == [1.0, 0.0] and np.isnan(row[2])


@pytest.mark.parametrize("csv, message", [
    ("image,shape,coat\na.png,spots,purple\n", "line 2, column 'coat': unknown label 'purple'"),
    ("image,shape,coat\na.png,holes,greasy\n", "line 2, column 'shape': unknown label 'holes'"),
    ("image,shape\na.png,spots\n", "task column 'coat' is absent"),
    ("image,shape,coat\na.png,spots,greasy\na.png,cracks,rotten\n", "line 3: image 'a.png' is listed twice"),
    ("image,shape,coat\n../x.png,spots,greasy\n", "line 2, column 'image': path '../x.png' leaves the dataset"),
    ("image,shape,coat\n/etc/passwd,spots,greasy\n", "absolute path"),
    ("image,shape,coat\n", "header but no rows"),
    ("", "the file is empty"),
    ("img,shape,coat\na.png,spots,greasy\n", "no 'image' column"),
    ("image,shape,coat,split\na.png,spots,greasy,holdout\n", "column 'split': 'holdout' is not one of"),
    ("image,shape,coat,weight\na.png,spots,greasy,heavy\n", "column 'weight': 'heavy' is not a number"),
    ("image,shape,coat,coat\na.png,spots,greasy,rotten\n", "line 1: column(s) 'coat' appear more than once"),
    ("image, shape,shape ,coat\na.png,spots,cracks,rotten\n", "column(s) 'shape' appear more than once"),
    ("image;shape;coat\na.png;spots;greasy\n", "the header looks separated by ';'"),
])
def test_bad_labels_get_clear_errors(tmp_path, csv, message):
    folder = write(tmp_path / "d", csv, images=["a.png"])
    with pytest.raises(LabelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_labels(folder)


def test_non_utf8_csv_names_line(tmp_path):
    folder = write(tmp_path / "d", "", images=["a.png"])
    (folder / "labels.csv").write_bytes("image,shape,coat\na.png,spots,greasy\nb\xe9.png,none,rotten\n".encode("latin-1"))
    with pytest.raises(LabelError, match="line 3: not UTF-8"):
        load_labels(folder)


def test_contradictory_row_and_missing_image(tmp_path):
    csv = ("image,shape,coat\n"
           "a.png,spots,greasy;rotten\n"     # two classes in a multiclass task
           "b.png,none;cracks,greasy\n"      # 'none' and a label
           "gone.png,spots,greasy\n"         # image file missing
           "c.png,cracks,rotten\n")
    folder = write(tmp_path / "d", csv, images=["a.png", "b.png", "c.png"])
    with pytest.raises(LabelError, match="3 problem"):
        load_labels(folder)
    report = load_labels(folder, on_problem="report")
    assert report.problems["row"].tolist() == [2, 3, 4]
    assert "expected exactly one class" in report.problems["problem"][0]
    # reported rows stay, the contradictory label becomes missing: never relabelled
    assert report.targets["coat"].tolist() == [-1, 0, 0, 1]
    assert np.isnan(report.targets["shape"][1]).all()
    dropped = load_labels(folder, on_problem="drop")
    assert dropped.table["image"].tolist() == ["c.png"]
    assert dropped.targets["coat"].tolist() == [1]


def test_none_is_a_valid_multiclass_class_but_not_a_multilabel_label(tmp_path):
    schema = TaskSchema((Task("fissure", "multiclass", ("none", "light", "severe")),))
    labels = load_labels(write(tmp_path / "d", "image,fissure\na.png,none\nb.png,severe\n", schema,
                               images=["a.png", "b.png"]), schema)
    assert labels.targets["fissure"].tolist() == [0, 2]
    with pytest.raises(SchemaError, match="'none' cannot be a label name"):
        Task("shape", "multilabel", ("none", "spots"))


def test_task_weights_replace_named_weights_only():
    schema = default_schema()  # shape and coat, half weight each
    assert parse_task_weights("coat=2, shape=0.5") == {"coat": 2.0, "shape": 0.5}
    assert parse_task_weights("coat=2 shape=1") == {"coat": 2.0, "shape": 1.0}
    assert parse_task_weights("coat:2, shape=1") == {"coat": 2.0, "shape": 1.0}  # ':' too (papermill help text)
    assert parse_task_weights("  ") == {}
    heavy = apply_task_weights(schema, "coat=1.5")
    assert heavy["coat"].weight == 1.5 and heavy["shape"].weight == schema["shape"].weight
    assert heavy.names == schema.names and heavy["coat"].labels == schema["coat"].labels
    # the combined score follows: coat now counts three times as much as shape
    assert heavy.combined_score({"shape": 0.2, "coat": 0.6}) == pytest.approx((0.5 * 0.2 + 1.5 * 0.6) / 2.0)
    assert apply_task_weights(schema, "") is schema
    assert apply_task_weights(schema, {"shape": 0.0})["shape"].weight == 0.0


def test_task_weights_errors_name_the_tasks():
    schema = default_schema()
    with pytest.raises(SchemaError, match=r"task_weights: unknown task\(s\) 'colour'; the schema has shape, coat"):
        apply_task_weights(schema, "colour=2")
    with pytest.raises(SchemaError, match="task_weights: at least one task needs a weight > 0"):
        apply_task_weights(schema, "shape=0 coat=0")
    with pytest.raises(SchemaError, match="'coat-2' is not 'task=weight'"):
        parse_task_weights("coat-2")
    with pytest.raises(SchemaError, match="'coat=' is not 'task=weight'"):
        parse_task_weights("coat=")


@pytest.mark.parametrize("name", ["weight", "group", "split", "mask", "image", "id", "Weight"])
@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_a_task_named_like_a_reserved_column_is_refused_naming_both_meanings(tmp_path, name, kind):
    # Issue 30: a binary task `weight` was accepted and its labels silently became the per-sample loss weight.
    import yaml
    from tongue_nb.data.tasks import RESERVED_COLUMNS
    labels = [name] if kind == "binary" else ["a", "b"]
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": name, "kind": kind, "labels": labels}]}))
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    message = str(info.value)
    assert message.startswith(f"{path}: task {name!r}: the column {name!r}") and "the task's labels" in message
    assert RESERVED_COLUMNS[name.lower()] in message and "rename the task" in message
    assert ("'<label>'" not in message) if kind == "binary" else (f"'{name}.<label>'" in message)


def test_every_column_labels_csv_reads_besides_the_tasks_is_reserved():
    from tongue_nb.data.labels import META_COLUMNS
    from tongue_nb.data.tasks import RESERVED_COLUMNS
    assert set(META_COLUMNS) <= set(RESERVED_COLUMNS)


@pytest.mark.parametrize("yaml_text, message", [
    ("labels: [no, yes, maybe]", "task 'coat': label #1 was read by YAML as bool false, not as text"),
    ("labels: [a, on]", "task 'coat': label #2 was read by YAML as bool true, not as text"),
    ("labels: [010, 020]", "task 'coat': label #1 was read by YAML as int 8, not as text"),
    ("labels: [a, 1.0]", "task 'coat': label #2 was read by YAML as float 1.0, not as text"),
    ("labels: [a, ~]", "task 'coat': label #2 is empty (YAML null); expected a name"),
])
def test_class_names_yaml_does_not_read_as_text_are_refused_asking_to_quote_them(tmp_path, yaml_text, message):
    # Before: [no, yes, maybe] silently became ['False', 'True', 'maybe'] and [010, 020] ['8', '16']; labels.csv's
    # 'no' was then blamed as an unknown label.
    path = tmp_path / "tasks.yaml"
    path.write_text(f"tasks:\n- name: coat\n  kind: multiclass\n  {yaml_text}\n")
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(info.value).startswith(f"{path}: {message}"), info.value
    if "null" not in message:
        assert "quote it in tasks.yaml, e.g. 'no' or '010'" in str(info.value)
    path.write_text("tasks:\n- name: coat\n  kind: multiclass\n  labels: ['no', 'yes', '010']\n")
    assert load_schema(path)["coat"].labels == ("no", "yes", "010")


@pytest.mark.parametrize("name, shown", [("yes", "bool true"), ("010", "int 8"), ("1.5", "float 1.5")])
def test_a_task_name_yaml_does_not_read_as_text_is_refused(tmp_path, name, shown):
    path = tmp_path / "tasks.yaml"
    path.write_text(f"tasks:\n- name: {name}\n  kind: binary\n")
    with pytest.raises(SchemaError, match=rf"tasks\.yaml: task #1: the name was read by YAML as {shown}, not as text.*"
                                          r"quote it in tasks\.yaml"):
        load_schema(path)


@pytest.mark.parametrize("tasks, says", [
    ("- {name: a, kind: binary}\n- {name: a, kind: binary}\n", "task names must be unique; repeated: a"),
    ("[]\n", "the schema has no tasks"),
    ("- {name: a, kind: binary, weight: 0}\n", "at least one task needs a weight > 0"),
    ("- {name: shape, kind: binary, weight: heavy}\n", r"task 'shape': weight: got 'heavy', expected a finite number"),
    ("- {name: shape, kind: binary, weight: [1]}\n", r"task 'shape': weight: got \[1\]"),
])
def test_every_schema_error_names_the_file_and_the_task(tmp_path, tasks, says):
    file = tmp_path / "tasks.yaml"
    file.write_text("tasks:\n" + "".join(f"  {line}\n" for line in tasks.splitlines()) if tasks != "[]\n"
                    else "tasks: []\n")
    with pytest.raises(SchemaError, match=rf"^{file}: {says}"):
        load_schema(file)
