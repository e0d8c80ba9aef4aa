"""Prompt tables: bundled strings, name mapping, the macaroni switch, malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from filo.errors import FiloError
from filo.prompts import PROMPTS_DIR, load_prompt_table

# the prompt data the released checkpoints were trained with, verbatim (a copy kept in the tests)
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference" / "filo_prompts.yaml"


@pytest.fixture(scope="module")
def table():
    return load_prompt_table()


def test_bundled_tables_equal_reference():
    with open(REFERENCE, encoding="utf-8") as f:
        ref = yaml.safe_load(f)
    for ds in ("mvtec", "visa"):
        t = load_prompt_table(dataset=ds)
        assert t.classes == ref[ds]
        assert t.positions == ref["positions"]
        assert t.grounding_words == ref["grounding_general_words"]
        assert t.normal_templates == ref["normal_templates"]
    assert "uneven shape " in load_prompt_table(dataset="visa").detail_phrases("macaroni1")


def test_bottle_prompts(table):
    normal = table.normal_prompts("bottle")
    assert normal == ["bottle", "flawless bottle", "perfect bottle", "unblemished bottle",
                      "bottle without flaw", "bottle without defect", "bottle without damage"]
    abnormal = table.abnormal_prompts("bottle")
    assert len(abnormal) == 15 * 9 == 135
    assert abnormal[0] == "abnormal bottle with cracked large at top left"
    assert abnormal[1] == "abnormal bottle with cracked large at top"
    assert abnormal[9] == "abnormal bottle with cracked small at top left"
    assert abnormal[-1] == "bottle with damage at bottom right"
    assert abnormal[10 * 9] == "damaged bottle at top left"
    at_center = table.abnormal_prompts("bottle", "center")
    assert len(at_center) == 15
    assert at_center == abnormal[4::9]
    assert table.positions[4] == "center" and len(table.positions) == 9
    with pytest.raises(FiloError, match="middle"):
        table.abnormal_prompts("bottle", "middle")


def test_name_mapping(table):
    assert table.has_class("metal_nut") and table.has_class("metal nut")
    assert table.detail_phrases("metal_nut")[0] == "cracks"
    assert table.normal_prompts("metal_nut")[1] == "flawless metal nut"
    assert table.abnormal_prompts("pipe_fryum")[0] == "abnormal pipe fryum with uneven shape at top left"
    assert table.normal_prompts("pcb3")[0] == "pcb"
    assert table.abnormal_prompts("pcb1")[0] == (
        "abnormal pcb with oxidation on the copper traces at top left")
    assert table.prompt_name("macaroni2") == "macaroni"
    assert not table.has_class("toaster")


def test_macaroni_switch(table):
    own1 = table.abnormal_prompts("macaroni1", "top")
    own2 = table.abnormal_prompts("macaroni2", "top")
    assert own1[0] == "abnormal macaroni with uneven shape  at top"  # trailing space kept
    assert own2[0] == "abnormal macaroni with irregular shape at top"
    legacy = load_prompt_table(dataset="visa", legacy_macaroni=True)
    assert legacy.abnormal_prompts("macaroni1", "top") == own2
    assert legacy.abnormal_prompts("macaroni2", "top") == own2
    # the grounding phrases stay per class in both modes
    assert legacy.detail_phrases("macaroni1")[0] == "uneven shape "


def test_unknown_class_message(table, tmp_path):
    with pytest.raises(FiloError, match=r"'toaster' is not in prompt file .*filo_mvtec.yaml.*add it"):
        table.detail_phrases("toaster")


def test_user_file_minimal(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("classes:\n  brass fitting:\n  - dent\n  - green spot\n")
    t = load_prompt_table(p)
    assert t.has_class("brass_fitting")
    assert t.abnormal_prompts("brass_fitting", "center")[0] == "abnormal brass fitting with dent at center"
    assert len(t.abnormal_prompts("brass_fitting")) == (2 + 5) * 9
    assert t.positions == load_prompt_table(dataset="mvtec").positions
    with pytest.raises(FiloError, match=r"'bottle' is not in prompt file .*mine.yaml"):
        t.normal_prompts("bottle")


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("classes:\n  bolt: []\n", r"mine\.yaml: class 'bolt' is empty"),
        ("classes:\n  bolt:\n  - dent\n  - 3\n", r"mine\.yaml: class 'bolt' entry 2 \(3\) is a int, not a string"),
        ("classes:\n  bolt:\n  - dent\n  - dent\n", r"mine\.yaml: class 'bolt' entry 2 \('dent'\) is a duplicate"),
        ("classes:\n  bolt:\n  - dent\n  - '  '\n", r"mine\.yaml: class 'bolt' entry 2 is blank"),
        ("classes:\n  bolt: [dent]\nnormal_templates: ['flawless {']\n", r"mine\.yaml: normal_templates: template 'flawless \{' has unbalanced braces"),
        ("classes:\n  bolt: [dent]\nnormal_templates: ['flawless {obj}']\n", r"mine\.yaml: normal_templates: template 'flawless \{obj\}' must contain exactly \{\}"),
        ("classes:\n  bolt: [dent]\nabnormal_detail_template: 'abnormal {cls}'\n", r"must contain exactly \{cls\} and \{detail\}"),
        ("classes:\n  bolt: [dent]\nabnormal_generic_templates: ['damaged }']\n", r"unbalanced braces"),
        ("classes:\n  metal_bolt: [dent]\n", r"class 'metal_bolt': write class names with spaces"),
        ("clases:\n  bolt: [dent]\n", r"unknown key\(s\) clases"),
        ("classes: [dent]\n", r"'classes:' must map class names"),
        ("classes:\n  bolt: [dent\n", r"mine\.yaml line \d+: not valid YAML"),
        ("classes:\n  bolt: [dent]\nclass_name_map:\n  nut: bolt\n", r"class_name_map names class 'nut'"),
    ],
)
def test_malformed_files(tmp_path, body, pattern):
    p = tmp_path / "mine.yaml"
    p.write_text(body)
    with pytest.raises(FiloError, match=pattern) as info:
        load_prompt_table(p)
    assert "\n" not in str(info.value)


def test_missing_file_and_dataset(tmp_path):
    with pytest.raises(FiloError, match="nope.yaml does not exist"):
        load_prompt_table(tmp_path / "nope.yaml")
    with pytest.raises(FiloError, match="no bundled prompt table for dataset 'kolektor'"):
        load_prompt_table(dataset="kolektor")
    assert load_prompt_table(dataset="btad").has_class("02")  # untuned tables ship too
    assert (PROMPTS_DIR / "filo_visa.yaml").is_file()
