"""Placing FAST ids in the language-model vocabulary, and refusing placements that collide."""

import numpy as np
import pytest

from ki.tokenizers import fast_mapping, prompt
from tests.tokenizers.action_chunks import TEXT_VOCAB_SIZE

VOCAB_SIZE = TEXT_VOCAB_SIZE + prompt.NUM_LOC_PIECES + prompt.NUM_SEG_PIECES


def test_default_is_openpi_pi0_fast_scheme_on_the_loc_pieces(prompt_tokenizer):
  mapping = fast_mapping.FastTokenMapping()
  lm_ids = mapping.to_lm([0, 1, 1023], VOCAB_SIZE)
  np.testing.assert_array_equal(lm_ids, [VOCAB_SIZE - 129, VOCAB_SIZE - 130, VOCAB_SIZE - 1152])
  # As with PaliGemma: FAST 0 is the last <loc> piece, FAST 1023 the first.
  assert prompt_tokenizer.id_to_piece(int(lm_ids[0])) == "<loc1023>"
  assert prompt_tokenizer.id_to_piece(int(lm_ids[2])) == "<loc0000>"
  np.testing.assert_array_equal(mapping.to_fast(lm_ids, VOCAB_SIZE), [0, 1, 1023])
  mapping.check(
    fast_vocab_size=1024, lm_vocab_size=VOCAB_SIZE, reserved_ids=prompt_tokenizer.reserved_ids()
  )


def test_reserved_ids_cover_specials_and_text_but_not_loc_or_seg(prompt_tokenizer):
  reserved = prompt_tokenizer.reserved_ids()
  assert reserved.shape == (VOCAB_SIZE,)
  for special in (prompt_tokenizer.pad_id, prompt_tokenizer.bos_id, prompt_tokenizer.eos_id):
    assert reserved[special]
  text_ids = prompt_tokenizer.encode(prompt.robot_prompt_text("wipe the table", np.zeros(8)))
  assert reserved[text_ids].all()
  assert not reserved[TEXT_VOCAB_SIZE:].any()  # The 1024 <loc> + 128 <seg> pieces.


def test_a_fast_range_reaching_into_text_pieces_is_refused(prompt_tokenizer):
  # A FAST vocabulary larger than the 1024 <loc> pieces spills into the text pieces (as FAST+'s
  # 2048 would on PaliGemma under the default scheme).
  with pytest.raises(ValueError, match="collide with .* ids used by special tokens or prompt text"):
    fast_mapping.FastTokenMapping().check(
      fast_vocab_size=1100,
      lm_vocab_size=VOCAB_SIZE,
      reserved_ids=prompt_tokenizer.reserved_ids(),
    )


def test_a_fast_range_on_special_tokens_is_refused(prompt_tokenizer):
  with pytest.raises(ValueError, match=r"collide.*0 \('<pad>'\)"):
    fast_mapping.FastTokenMapping(scheme="offset", offset=0).check(
      fast_vocab_size=16,
      lm_vocab_size=VOCAB_SIZE,
      reserved_ids=prompt_tokenizer.reserved_ids(),
      describe_id=lambda i: repr(prompt_tokenizer.id_to_piece(i)),
    )


def test_a_fast_range_outside_the_vocabulary_is_refused(prompt_tokenizer):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    fast_mapping.FastTokenMapping(scheme="offset", offset=VOCAB_SIZE).check(
      fast_vocab_size=16, lm_vocab_size=VOCAB_SIZE, reserved_ids=prompt_tokenizer.reserved_ids()
    )


def test_offset_scheme_onto_rows_past_the_sentencepiece_vocabulary(prompt_tokenizer):
  mapping = fast_mapping.FastTokenMapping(scheme="offset", offset=VOCAB_SIZE)
  mapping.check(
    fast_vocab_size=2048,
    lm_vocab_size=VOCAB_SIZE + 2048,
    reserved_ids=prompt_tokenizer.reserved_ids(),
  )
  assert mapping.lm_range(2048, VOCAB_SIZE + 2048) == (VOCAB_SIZE, VOCAB_SIZE + 2048)


def test_unknown_scheme_is_refused():
  with pytest.raises(ValueError, match="Unknown FAST mapping scheme"):
    fast_mapping.FastTokenMapping(scheme="reversed")
