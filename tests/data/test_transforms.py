"""Per-example transforms: image geometry, augmentation, camera/instruction choice, normalisation,
and every bad-input case becoming a counted Dropped marker instead of an exception."""

import numpy as np
from PIL import Image
import pytest

from ki import msgpack_numpy
from ki.batch import Batch
from ki.data import droid, images, normalize, sources, transforms
from ki.data.transforms import Dropped
from tests.data import pipeline_fixtures as fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return fixtures.tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def stats():
  return fixtures.norm_stats([fixtures.frame(e, s) for e in range(3) for s in range(10)])


def robot_transform(tokenizer, stats, **overrides):
  kwargs = dict(
    tokenizer=tokenizer,
    norm_stats=stats,
    action_dim=fixtures.ACTION_DIM,
    action_horizon=fixtures.HORIZON,
    delta_action_mask=droid.DEFAULT_DELTA_ACTION_MASK,
    augment=True,
    image_size=fixtures.IMAGE_SIZE,
  )
  return transforms.RobotTransform(**{**kwargs, **overrides})


def test_resize_with_pad_keeps_aspect_and_centres_on_black():
  image = Image.fromarray(np.full((180, 320, 3), 200, np.uint8))
  out = np.asarray(images.resize_with_pad(image, 224, 224))
  assert out.shape == (224, 224, 3)
  # 320 -> 224 wide means 180 -> 126 high, centred: 49 black rows above, 49 below.
  assert np.all(out[:49] == 0) and np.all(out[175:] == 0)
  assert np.all(out[49:175] == 200)


def test_augmentation_is_deterministic_and_wrist_gets_colour_only():
  image = Image.fromarray(np.full((32, 32, 3), 120, np.uint8))
  first = images.augment(image, np.random.default_rng(3), geometric=True)
  again = images.augment(image, np.random.default_rng(3), geometric=True)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  # Rotating a uniform image leaves black corners; colour jitter alone keeps it uniform.
  corners = [
    np.asarray(images.augment(image, np.random.default_rng(s), geometric=True))[0, 0]
    for s in range(8)
  ]
  assert any(np.all(c == 0) for c in corners)
  for seed in range(8):
    wrist = np.asarray(images.augment(image, np.random.default_rng(seed), geometric=False))
    assert np.all(wrist == wrist[0, 0])


def test_fused_augmentation_matches_openpis_step_by_step_order():
  # A smooth source so that the only differences are interpolation, which is done once (fused)
  # instead of three times; they concentrate on the content/black borders.
  y, x = np.mgrid[0:180, 0:320]
  source = np.stack(
    [128 + 100 * np.sin(x / 25), 128 + 100 * np.cos(y / 20), 128 + 60 * np.sin((x + y) / 30)], -1
  ).astype(np.uint8)
  data = fixtures.png(source)
  for seed in range(4):
    fused = images.prepare_image(data, size=224, rng=np.random.default_rng(seed), geometric=True)
    padded = images.resize_with_pad(images.decode_jpeg(data), 224, 224)
    reference = images.augment(padded, np.random.default_rng(seed), geometric=True)
    difference = np.abs(fused.astype(int) - np.asarray(reference, int))
    assert difference.mean() < 3 and (difference > 20).mean() < 0.03


def test_robot_example_matches_contract(tokenizer, stats):
  record = fixtures.frame(1, 3)
  example = robot_transform(tokenizer, stats, augment=False)(record, np.random.default_rng(0))
  assert isinstance(example, Batch)
  obs = example.observation
  assert obs.images["base_0_rgb"].shape == (32, 32, 3)
  assert obs.images["base_0_rgb"].dtype == np.uint8
  assert obs.image_masks == {"base_0_rgb": True, "left_wrist_0_rgb": True}
  assert obs.has_actions
  assert obs.state.shape == (fixtures.ACTION_DIM,)
  assert example.actions.shape == (fixtures.HORIZON, fixtures.ACTION_DIM)
  # Quantile-normalised state; joints of the actions relative to the state; zero padding.
  np.testing.assert_allclose(
    obs.state[:8], normalize.quantile_normalize(record["state"], stats["state"]), rtol=1e-6
  )
  delta = droid.to_delta_actions(record["actions"], record["state"])
  np.testing.assert_allclose(
    example.actions[:, :8], normalize.quantile_normalize(delta, stats["actions"]), rtol=1e-5
  )
  assert np.all(obs.state[8:] == 0) and np.all(example.actions[:, 8:] == 0)
  assert obs.tokenized_prompt.shape == (fixtures.MAX_TOKEN_LEN,)
  # The FAST postfix carries the loss; the prompt does not.
  loss, ar = obs.token_loss_mask, obs.token_ar_mask
  assert loss.any() and not loss[0] and np.all(ar[loss] == 1)


def test_camera_and_instruction_choice_is_random_per_index_and_deterministic(tokenizer, stats):
  transform = robot_transform(tokenizer, stats, augment=False)
  record = fixtures.frame(0, 0, instructions=["open the drawer", "", "pick up the red block"])
  prompt_tokenizer = tokenizer.prompt_tokenizer
  colours, texts = set(), set()
  for seed in range(24):
    example = transform(record, np.random.default_rng(seed)).observation
    again = transform(record, np.random.default_rng(seed)).observation
    np.testing.assert_array_equal(example.images["base_0_rgb"], again.images["base_0_rgb"])
    np.testing.assert_array_equal(example.tokenized_prompt, again.tokenized_prompt)
    centre = example.images["base_0_rgb"][16, 16]
    colours.add("red" if centre[0] > centre[1] else "green")
    # The wrist camera (blue) always goes to the wrist slot.
    wrist = example.images["left_wrist_0_rgb"][16, 16]
    assert wrist[2] > 150 and wrist[0] < 50
    text = prompt_tokenizer.decode(example.tokenized_prompt[example.token_ar_mask == 0])
    texts.add("drawer" if "open the drawer" in text else "block" if "red block" in text else "?")
  assert colours == {"red", "green"}
  assert texts == {"drawer", "block"}


def corrupted(**changes):
  record = fixtures.frame(2, 5)
  for key, value in changes.items():
    if key in record["images"]:
      record["images"] = {**record["images"], key: value}
    else:
      record[key] = value
  return record


@pytest.mark.parametrize(
  "record, reason",
  [
    (corrupted(wrist_image_left=b"\xff\xd8 truncated jpeg"), "corrupt_image"),
    (corrupted(exterior_image_1_left=b"", exterior_image_2_left=b""), "corrupt_image"),
    (corrupted(state=np.array([np.nan] + [0.0] * 7, np.float32)), "non_finite"),
    (corrupted(actions=np.full((fixtures.HORIZON, 8), np.inf, np.float32)), "non_finite"),
    (corrupted(state=np.zeros(7, np.float32)), "bad_shape"),
    (corrupted(actions=np.zeros((fixtures.HORIZON - 1, 8), np.float32)), "bad_shape"),
    ({"state": np.zeros(8, np.float32)}, "bad_shape"),
    (corrupted(instructions=["", "", ""]), "no_instruction"),
  ],
)
def test_bad_robot_input_is_dropped_with_its_reason(tokenizer, stats, record, reason):
  assert robot_transform(tokenizer, stats)(record, np.random.default_rng(0)) == Dropped(reason)


def test_over_long_prompt_is_dropped_as_too_long(tmp_path, stats):
  short = fixtures.tokenizer(tmp_path, max_token_len=12)
  transform = robot_transform(short, stats)
  assert transform(fixtures.frame(0, 1), np.random.default_rng(0)) == Dropped("too_long")


def test_record_decoding_classifies_bad_bytes():
  good = fixtures.frame(0, 1)
  assert isinstance(sources.decode_frame_record(msgpack_numpy.packb(good)), dict)
  assert sources.decode_frame_record(b"\x00garbage") == Dropped("bad_shape")
  nan_state = {**good, "state": np.full(8, np.nan, np.float32)}
  assert sources.decode_frame_record(msgpack_numpy.packb(nan_state)) == Dropped("non_finite")
  missing = {k: v for k, v in good.items() if k != "instructions"}
  assert sources.decode_frame_record(msgpack_numpy.packb(missing)) == Dropped("bad_shape")


def test_vlm_example_masks_wrist_and_puts_loss_on_answer(tokenizer):
  transform = transforms.VlmTransform(
    tokenizer=tokenizer,
    action_dim=fixtures.ACTION_DIM,
    action_horizon=fixtures.HORIZON,
    image_size=fixtures.IMAGE_SIZE,
  )
  record = {"image": fixtures.jpeg((0, 0, 200)), "prompt": "where is the cup?", "answer": "left"}
  example = transform(record, np.random.default_rng(0))
  obs = example.observation
  assert not obs.has_actions
  assert obs.image_masks == {"base_0_rgb": True, "left_wrist_0_rgb": False}
  assert not obs.images["left_wrist_0_rgb"].any()
  assert not obs.state.any() and not example.actions.any()
  assert example.actions.shape == (fixtures.HORIZON, fixtures.ACTION_DIM)
  answer = obs.tokenized_prompt[obs.token_loss_mask]
  assert answer[-1] == tokenizer.prompt_tokenizer.eos_id
  assert tokenizer.prompt_tokenizer.decode(answer[:-1]) == "left"
  assert transform({**record, "image": b"nope"}, np.random.default_rng(0)) == Dropped(
    "corrupt_image"
  )
  assert transform({**record, "answer": ""}, np.random.default_rng(0)) == Dropped("no_instruction")
  assert transform({"image": b""}, np.random.default_rng(0)) == Dropped("bad_shape")
