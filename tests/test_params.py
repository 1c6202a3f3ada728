"""TrainParams: defaults, YAML files and overrides, and every kind of bad value."""
import dataclasses

import pytest
import yaml

from tongue_nb.train.params import ParamError, TrainParams, load_params, notebook_parameters_source, params_from_namespace


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    params = TrainParams()
    path = params.to_yaml(tmp_path / "params.yaml")
    assert load_params(files=[path]) == params
    assert yaml.safe_load(path.read_text())["backbone"] == params.backbone


def test_precedence_defaults_file_values_overrides(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("batch_size: 8\nstage2_lr_backbone: 1e-5\nbackbone: resnet18\n")
    second = tmp_path / "b.yaml"
    second.write_text("batch_size: 4\n")
    p = load_params(files=[first, second], overrides=["pretrained=false", "stage2_lr_head=3e-4"],
                    backbone="test_convnext")
    assert p.batch_size == 4                   # later file wins
    assert p.stage2_lr_backbone == pytest.approx(1e-5)   # YAML '1e-5' string read as a float
    assert p.backbone == "test_convnext"       # keyword beats file
    assert p.pretrained is False and p.stage2_lr_head == pytest.approx(3e-4)
    assert p.stage1_epochs == TrainParams().stage1_epochs


@pytest.mark.parametrize("kwargs, words", [
    ({"batch_size": 0}, ["batch_size", "> 0"]),
    ({"batch_size": -4}, ["batch_size", "> 0"]),
    ({"stage1_epochs": -1}, ["stage1_epochs", ">= 0"]),
    ({"stage1_epochs": 0, "stage2_epochs": 0}, ["stage1_epochs + stage2_epochs"]),
    ({"stage2_lr_backbone": 0.0}, ["stage2_lr_backbone", "> 0"]),
    ({"stage1_lr_head": -1e-3}, ["stage1_lr_head", "> 0"]),
    ({"precision": "fp64"}, ["precision", "bf16"]),
    ({"class_weighting": "inverse"}, ["class_weighting", "balanced"]),
    ({"batch_size": "eight"}, ["batch_size", "integer"]),
    ({"batch_size": 2.5}, ["batch_size", "integer"]),
    ({"pretrained": "maybe"}, ["pretrained", "boolean"]),
    ({"stage1_lr_head": "fast"}, ["stage1_lr_head", "number"]),
    ({"backbone": 3}, ["backbone", "string"]),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, ["val_fraction + test_fraction"]),
    ({"device": "gpu"}, ["device", "cuda:N"]),
    ({"label_smoothing": 1.0}, ["label_smoothing", "< 1"]),
    ({"augment_strength": 5}, ["augment_strength", "<= 4"]),
    ({"augment_strength": -1}, ["augment_strength", ">= 0"]),
    ({"task_weights": "coat_color"}, ["task_weights", "'coat_color'", "task=weight"]),
    ({"task_weights": "coat_color=-1"}, ["task_weights", "'coat_color=-1'", ">= 0"]),
    ({"task_weights": "coat_color=two"}, ["task_weights", "finite weight"]),
    ({"task_weights": "a=1, a=2"}, ["task_weights", "'a' is given twice"]),
])
def test_bad_values_name_the_parameter_and_expectation(kwargs, words):
    with pytest.raises(ParamError) as err:
        load_params(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_name_suggests_close_match(tmp_path):
    with pytest.raises(ParamError, match="did you mean batch_size"):
        load_params(batchsize=8)
    bad = tmp_path / "recipe.yaml"
    bad.write_text("stage2_lr_bakbone: 1e-4\n")
    with pytest.raises(ParamError) as err:
        load_params(files=[bad])
    assert "recipe.yaml" in str(err.value) and "stage2_lr_backbone" in str(err.value)
    with pytest.raises(ParamError, match="expected key=value"):
        load_params(overrides=["batch_size"])
    with pytest.raises(ParamError, match="override 'epochz=3'"):
        load_params(overrides=["epochz=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        load_params(files=[tmp_path / "nope.yaml"])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ParamError, match="mapping"):
        load_params(files=[listy])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("batch_size: [1, 2]\n")
    with pytest.raises(ParamError, match=r"batch_size \(from .*wrong.yaml\)"):
        load_params(files=[wrong])
    twice = tmp_path / "twice.yaml"  # PyYAML alone keeps the last value without a word
    twice.write_text("batch_size: 16\nlr_note: x\nbatch_size: 32\n")
    with pytest.raises(ParamError, match=r"twice.yaml: not valid YAML .*key 'batch_size' is given twice in one "
                                         r"mapping \(lines 1 and 3\)"):
        load_params(files=[twice])
    nested = tmp_path / "nested.yaml"
    nested.write_text("per_backbone:\n  test_vit:\n    lr: 1\n    lr: 2\n")
    with pytest.raises(ParamError, match="key 'lr' is given twice"):
        load_params(files=[nested])
    merged = tmp_path / "merged.yaml"  # a YAML merge key overridden on purpose is not a repeat
    merged.write_text("base: &b {batch_size: 8}\nper_backbone:\n  test_vit:\n    <<: *b\n    batch_size: 4\n")
    from tongue_nb.yamlfile import safe_load
    assert safe_load(merged.read_text())["per_backbone"]["test_vit"] == {"batch_size": 4}


def test_replace_rechecks():
    with pytest.raises(ParamError, match="batch_size"):
        dataclasses.replace(TrainParams(), batch_size=0)


def test_experiment_name_default_and_eval_batch():
    import datetime as dt
    p = TrainParams(backbone="convnext_tiny", image_size=224)
    assert p.resolved_experiment_name(today=dt.date(2024, 5, 1)) == "20240501-convnext_tiny-224"
    assert TrainParams(experiment_name="x").resolved_experiment_name() == "x"
    assert TrainParams(batch_size=8).effective_eval_batch_size == 16


def test_notebook_source_lists_every_field_and_namespace_keeps_file_values(tmp_path):
    src = notebook_parameters_source({"params_file": ("str", "", "YAML recipe")})
    namespace: dict = {}
    exec(src, namespace)  # the generated cell is valid Python with the defaults
    for f in dataclasses.fields(TrainParams):
        assert namespace[f.name] == f.default
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 4\nstage1_epochs: 1\n")
    namespace["stage1_epochs"] = 3  # set in the notebook: wins; batch_size left at default: file wins
    p = params_from_namespace(namespace, recipe)
    assert p.batch_size == 4 and p.stage1_epochs == 3


def test_per_backbone_sections_apply_to_their_backbone_only(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("image_size: 64\npretrained: false\nper_backbone:\n"
                      "  tf_efficientnet_lite0: {pretrained: true, image_size: 96}\n")
    lite = load_params(files=[recipe], backbone="tf_efficientnet_lite0")
    assert (lite.pretrained, lite.image_size) == (True, 96)
    other = load_params(files=[recipe], backbone="resnet18")
    assert (other.pretrained, other.image_size) == (False, 64)
    # values and overrides still win over a section; the backbone may come from an override too
    assert load_params(files=[recipe], backbone="tf_efficientnet_lite0", image_size=128).image_size == 128
    assert load_params(files=[recipe], overrides=["backbone=tf_efficientnet_lite0"]).image_size == 96
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_backbone:\n  resnet18: {batchsize: 8}\n")
    with pytest.raises(ParamError, match=r"batchsize.*per_backbone\.resnet18"):
        load_params(files=[bad], backbone="resnet18")
    bad.write_text("per_backbone: [1, 2]\n")
    with pytest.raises(ParamError, match="per_backbone must map"):
        load_params(files=[bad])


def test_per_backbone_sections_match_short_and_timm_names_and_refuse_unknown_ones(tmp_path):
    """A section named by the timm name applies to the short name and back; a misspelt section (which no backbone
    would ever read) and two sections for one backbone are refused, naming the file and the section."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 16\nper_backbone:\n  vit_base_patch16_224: {batch_size: 4}\n  swin_tiny: {batch_size: 8}\n")
    assert load_params(files=[recipe], backbone="vit_base").batch_size == 4
    assert load_params(files=[recipe], backbone="swin_tiny_patch4_window7_224").batch_size == 8
    assert load_params(files=[recipe], backbone="test_convnext").batch_size == 16
    recipe.write_text("batch_size: 16\nper_backbone:\n  test_convnxt: {batch_size: 2}\n")
    with pytest.raises(ParamError, match=rf"{recipe}: per_backbone\.test_convnxt: unknown backbone.*did you mean "
                                         "test_convnext"):
        load_params(files=[recipe], backbone="test_convnext")
    recipe.write_text("per_backbone:\n  vit_base: {batch_size: 2}\n  vit_base_patch16_224: {batch_size: 3}\n")
    with pytest.raises(ParamError, match=r"sections \['vit_base', 'vit_base_patch16_224'\] for one backbone"):
        load_params(files=[recipe], backbone="vit_base")


def test_every_numeric_parameter_declares_its_range():
    """A number field with no bound accepts anything (a negative seed reached numpy as 'expected non-negative
    integer'); every parameters class (the notebooks' too) declares each number's range, so the one field checker
    names it."""
    from tongue_nb.model.segment import SegParams
    from tongue_nb.pipeline.compare import CompareParams
    from tongue_nb.pipeline.notebook_params import NOTEBOOK_PARAMS

    unbounded = [f"{cls.__name__}.{f.name}" for cls in (TrainParams, CompareParams, SegParams, *NOTEBOOK_PARAMS.values())
                 for f in dataclasses.fields(cls)
                 if f.type in ("int", "float", int, float) and not f.metadata.get("choices")
                 and all(f.metadata.get(k) is None for k in ("gt", "ge", "lt", "le"))]
    assert unbounded == []


@pytest.mark.parametrize("value", [-1, 2.5, "x"])
def test_compare_seed_is_checked(value):
    from tongue_nb.pipeline.compare import CompareParams

    with pytest.raises(ParamError, match="parameter seed"):
        CompareParams(seed=value)


def test_a_parameter_given_twice_is_refused_not_replaced():
    with pytest.raises(ParamError, match=r"override 'batch_size=32': batch_size is already set by 'batch_size=16'"):
        load_params(overrides=["batch_size=16", "batch_size=32"])
    with pytest.raises(ParamError, match=r"override 'seed=2': seed is also given as 1"):
        load_params(overrides=["seed=2"], seed=1)
    same = load_params(overrides=["seed=1", "pretrained=false"], seed=1)  # one wish, said twice alike: fine
    assert same.seed == 1 and same.pretrained is False
