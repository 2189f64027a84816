"""Fixtures shared by the tokenizer tests: smooth action chunks, a fitted FAST tokenizer and a small
SentencePiece model in PaliGemma's layout, each built once per session (nothing is downloaded)."""

import numpy as np
import pytest

from ki.tokenizers import fast, prompt
from tests.tokenizers.action_chunks import ACTION_DIM, INSTRUCTIONS, TEXT_VOCAB_SIZE, smooth_chunks


@pytest.fixture(scope="session")
def training_chunks() -> np.ndarray:
  return smooth_chunks(np.random.default_rng(0), 600)


@pytest.fixture(scope="session")
def fast_tokenizer(training_chunks) -> fast.FastTokenizer:
  return fast.FastTokenizer.fit(training_chunks, vocab_size=512, scale=10.0)


@pytest.fixture(scope="session")
def sentencepiece_path(tmp_path_factory) -> str:
  rng = np.random.default_rng(1)
  texts = [
    prompt.robot_prompt_text(instruction, rng.uniform(-1, 1, ACTION_DIM))
    for instruction in INSTRUCTIONS * 20
  ]
  out = tmp_path_factory.mktemp("sentencepiece") / "paligemma_like.model"
  return prompt.build_sentencepiece_model(texts, out, text_vocab_size=TEXT_VOCAB_SIZE)


@pytest.fixture(scope="session")
def prompt_tokenizer(sentencepiece_path) -> prompt.PromptTokenizer:
  return prompt.PromptTokenizer(sentencepiece_path)
