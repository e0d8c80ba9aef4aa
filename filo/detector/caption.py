"""Captions, phrases and phrase matching for the GroundingDINO step (docs/design.md section 6)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch


def preprocess_caption(caption: str) -> str:
    """Lower-case, strip, and end with "." (GroundingDINO's own caption rule)."""
    text = caption.lower().strip()
    return text if text.endswith(".") else text + "."


def build_caption(general_words: Sequence[str], detail_phrases: Sequence[str]) -> str:
    """The general words then the class's detail phrases, joined with " . ", preprocessed."""
    return preprocess_caption(" . ".join([*general_words, *detail_phrases]))


def phrase_from_token_probs(token_probs: torch.Tensor, input_ids: Sequence[int], tokenizer,
                            text_threshold: float, left_idx: int = 0,
                            right_idx: int = 255) -> str:
    """Decode the caption tokens whose probability exceeds ``text_threshold``.

    As GroundingDINO's ``get_phrases_from_posmap`` (the version FiLo vendors): positions
    ``0 .. left_idx`` (the ``[CLS]`` token) and ``right_idx ..`` are never selected; the other
    selected token ids ("." included when selected) go through ``tokenizer.decode`` in caption
    order. Positions past the caption's tokens are ignored. Unlike it, tokenizer tokens never
    reach the phrase (design.md section 6): special tokens (``[SEP]``, ``[CLS]``, ``[PAD]``
    ...) are dropped before decoding and a word piece selected without its word start loses its
    ``##`` mark. Box matching is unchanged (no word or phrase contains those tokens).
    """
    n = min(len(input_ids), right_idx)
    probs = token_probs[:n].clone()
    probs[: left_idx + 1] = 0.0
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    picked = [int(input_ids[i]) for i in torch.nonzero(probs > text_threshold).flatten().tolist()]
    picked = [t for t in picked if t not in special]
    if not picked:
        return ""
    return clean_phrase(tokenizer.decode(picked, clean_up_tokenization_spaces=True,
                                         skip_special_tokens=True))


_SPECIAL_TOKENS = re.compile(r"\[(?:SEP|CLS|PAD|UNK|MASK)\]", re.IGNORECASE)


def clean_phrase(text: str) -> str:
    """A phrase without tokenizer tokens: no ``[SEP]`` / ``[CLS]`` / ``[PAD]`` / ``[UNK]`` /
    ``[MASK]``, no ``##`` word-piece marks, single spaces. Also for phrases read back from
    older caches and box files."""
    text = _SPECIAL_TOKENS.sub(" ", text)
    text = re.sub(r"\s*##", "", text)
    return " ".join(text.split())


def phrase_matches(phrase: str, words: Sequence[str], case_sensitive: bool = False) -> bool:
    """True if any of ``words`` (detail phrases or general words) is a substring of ``phrase``.

    Case-insensitive by default. ``case_sensitive=True`` is the research code's behaviour, where
    detail phrases with capitals never match the lower-case decoded phrase.
    """
    if case_sensitive:
        return any(w and w in phrase for w in words)
    low = phrase.lower()
    return any(w and w.lower() in low for w in words)


def matched_word(phrase: str, words: Sequence[str], case_sensitive: bool = False) -> str | None:
    """The longest of ``words`` found in ``phrase`` (the rule of :func:`phrase_matches`), or None.

    Longest first, so a detail phrase ("scratch on surface") wins over a word inside it.
    """
    low = phrase if case_sensitive else phrase.lower()
    found = [w for w in words if w and (w if case_sensitive else w.lower()) in low]
    return max(found, key=len) if found else None
