"""The SentencePiece model, the pi0.5 prompt with discrete state, VLM examples, over-long ones."""

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from ki.tokenizers import fast_mapping, prompt
from tests.tokenizers.action_chunks import ACTION_DIM, HORIZON, TEXT_VOCAB_SIZE, smooth_chunks

VOCAB_SIZE = TEXT_VOCAB_SIZE + prompt.NUM_LOC_PIECES + prompt.NUM_SEG_PIECES
# Known state -> bins: -1 is bin 0, -0.5 bin 64, 0 bin 128, 0.999 and 1 bin 255, below -1 gives -1.
STATE = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, -1.2, 0.5, 0.25])
PROMPT = "Task: Pick up the red cup, State: 0 64 128 255 255 -1 192 160;\nAction: "


def test_built_model_has_paligemma_layout(sentencepiece_path, prompt_tokenizer):
  assert prompt_tokenizer.vocab_size == VOCAB_SIZE
  assert (prompt_tokenizer.pad_id, prompt_tokenizer.eos_id, prompt_tokenizer.bos_id) == (0, 1, 2)
  with open(sentencepiece_path, "rb") as f:
    pieces = sentencepiece_model_pb2.ModelProto.FromString(f.read()).pieces
  assert pieces[TEXT_VOCAB_SIZE].piece == "<loc0000>"
  assert pieces[TEXT_VOCAB_SIZE + 1023].piece == "<loc1023>"
  assert pieces[-1].piece == "<seg127>"


def test_too_small_text_vocabulary_is_named(tmp_path):
  with pytest.raises(ValueError, match="could not build a 100-piece text vocabulary"):
    prompt.build_sentencepiece_model(
      ["hello world"] * 10, tmp_path / "x.model", text_vocab_size=100
    )


def test_vocab_size_must_match_the_model_config(sentencepiece_path):
  with pytest.raises(ValueError, match=f"has {VOCAB_SIZE} pieces but the model config expects"):
    prompt.PromptTokenizer(sentencepiece_path, expected_vocab_size=257152)


def test_loads_through_gfile_for_remote_paths(sentencepiece_path):
  tf = pytest.importorskip("tensorflow")
  remote = "ram://tokenizers/paligemma_like.model"
  with open(sentencepiece_path, "rb") as f:
    tf.io.gfile.GFile(remote, "wb").write(f.read())
  assert prompt.PromptTokenizer(remote, expected_vocab_size=VOCAB_SIZE).vocab_size == VOCAB_SIZE


def test_exact_robot_prompt_and_masks_for_inference(prompt_tokenizer):
  assert prompt.robot_prompt_text("  Pick_up the red cup\n", STATE) == PROMPT
  tokenizer = prompt.Pi05Tokenizer(prompt_tokenizer, None, max_token_len=96)
  out = tokenizer.tokenize_robot("  Pick_up the red cup\n", STATE)
  text_ids = prompt_tokenizer.encode(PROMPT)
  length = 1 + len(text_ids)
  assert prompt_tokenizer.decode(text_ids) == PROMPT
  np.testing.assert_array_equal(
    out["tokenized_prompt"], [prompt_tokenizer.bos_id] + text_ids + [0] * (96 - length)
  )
  np.testing.assert_array_equal(out["tokenized_prompt_mask"], np.arange(96) < length)
  assert not out["token_ar_mask"].any() and not out["token_loss_mask"].any()
  assert out["tokenized_prompt"].dtype == np.int32 and out["token_ar_mask"].dtype == np.int32
  assert out["tokenized_prompt_mask"].dtype == bool and out["token_loss_mask"].dtype == bool


def test_training_postfix_is_fast_then_bar_then_eos(prompt_tokenizer, fast_tokenizer):
  tokenizer = prompt.Pi05Tokenizer(prompt_tokenizer, fast_tokenizer, max_token_len=128)
  actions = smooth_chunks(np.random.default_rng(20), 1)[0]
  out = tokenizer.tokenize_robot("Pick up the red cup", STATE, actions)
  prefix_length = 1 + len(prompt_tokenizer.encode(PROMPT))
  fast_ids = fast_tokenizer.encode(actions)
  bar = prompt_tokenizer.encode("|")
  length = prefix_length + len(fast_ids) + len(bar) + 1
  tokens = out["tokenized_prompt"]
  np.testing.assert_array_equal(
    tokens[prefix_length:length],
    list(VOCAB_SIZE - 129 - np.asarray(fast_ids)) + bar + [prompt_tokenizer.eos_id],
  )
  expected_ar = np.zeros(128, np.int32)
  expected_ar[prefix_length:length] = 1
  np.testing.assert_array_equal(out["token_ar_mask"], expected_ar)
  np.testing.assert_array_equal(out["token_loss_mask"], expected_ar.astype(bool))
  np.testing.assert_array_equal(out["tokenized_prompt_mask"], np.arange(128) < length)
  # The FAST part maps back to the actions, within the quantisation bound.
  decoded, valid = tokenizer.decode_actions(tokens[prefix_length:])  # Stops at "|".
  assert valid
  assert np.linalg.norm(decoded - actions, axis=0).max() <= 0.5 * np.sqrt(HORIZON) / 10 + 1e-6
  # Generated ids that stop early, or hold text, do not decode.
  assert not tokenizer.decode_actions(tokens[prefix_length : length - 5])[1]
  assert not tokenizer.decode_actions(tokens[:length])[1]


def test_vlm_example_masks(prompt_tokenizer):
  tokenizer = prompt.Pi05Tokenizer(prompt_tokenizer, None, max_token_len=64)
  out = tokenizer.tokenize_vlm("What is on the table?", "a red cup")
  question = [prompt_tokenizer.bos_id] + prompt_tokenizer.encode("What is on the table?")
  answer = prompt_tokenizer.encode("a red cup") + [prompt_tokenizer.eos_id]
  length = len(question) + len(answer)
  np.testing.assert_array_equal(out["tokenized_prompt"][:length], question + answer)
  assert not out["tokenized_prompt"][length:].any()
  expected = np.zeros(64, bool)
  expected[len(question) : length] = True
  np.testing.assert_array_equal(out["token_loss_mask"], expected)
  np.testing.assert_array_equal(out["token_ar_mask"], expected.astype(np.int32))


def test_over_long_examples_are_dropped_and_counted(prompt_tokenizer, fast_tokenizer):
  actions = smooth_chunks(np.random.default_rng(21), 1)[0]
  prefix_length = 1 + len(prompt_tokenizer.encode(PROMPT))
  # Room for the whole prefix but not the postfix: the example goes, it is never truncated.
  tokenizer = prompt.Pi05Tokenizer(
    prompt_tokenizer, fast_tokenizer, max_token_len=prefix_length + 2
  )
  assert tokenizer.tokenize_robot("Pick up the red cup", STATE, actions) is None
  assert tokenizer.tokenize_vlm("a long question " * 20, "answer") is None
  assert tokenizer.num_dropped == 2
  assert tokenizer.tokenize_robot("Pick up the red cup", STATE) is not None  # Fits without actions.
  assert tokenizer.num_dropped == 2


def test_bad_inputs_are_named(prompt_tokenizer, fast_tokenizer):
  tokenizer = prompt.Pi05Tokenizer(prompt_tokenizer, None, max_token_len=64)
  with pytest.raises(ValueError, match="no FAST tokenizer"):
    tokenizer.tokenize_robot("go", STATE, np.zeros((HORIZON, ACTION_DIM)))
  with pytest.raises(ValueError, match="state must be a finite vector"):
    tokenizer.tokenize_robot("go", np.full(8, np.nan))
  with pytest.raises(ValueError, match="collide"):
    prompt.Pi05Tokenizer(
      prompt_tokenizer,
      fast_tokenizer,
      max_token_len=64,
      fast_mapping=fast_mapping.FastTokenMapping(scheme="offset", offset=3),
    )


def test_text_spelling_out_fast_range_pieces_is_refused(prompt_tokenizer, fast_tokenizer):
  # Detection-style answers ("<loc0042>") would alias FAST action tokens on the <loc> pieces.
  tokenizer = prompt.Pi05Tokenizer(prompt_tokenizer, fast_tokenizer, max_token_len=64)
  with pytest.raises(ValueError, match="inside the FAST id range"):
    tokenizer.tokenize_vlm("Detect the cup", "<loc1020><loc1021> cup")
  # Without FAST tokens nothing lives there, and the text is ordinary.
  no_fast = prompt.Pi05Tokenizer(prompt_tokenizer, None, max_token_len=64)
  assert no_fast.tokenize_vlm("Detect the cup", "<loc1020><loc1021> cup") is not None
