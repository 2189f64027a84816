from ki import batch as batch_lib
from ki.model import pi05


def test_full_pi05_ki_flops_match_the_papers_figure():
  # ki_method.md: ~11 TFLOP per training example, 2 cameras, 200 text + 60 FAST tokens, H = 50.
  config = pi05.Config(action_horizon=50, max_token_len=260, max_loss_tokens=60)
  assert 10.0e12 < pi05.training_flops_per_example(config) < 12.0e12


def test_flops_grow_with_cameras_and_text():
  base = pi05.Config()
  more_cameras = pi05.Config(image_keys=batch_lib.CAMERA_SLOTS)
  more_text = pi05.Config(max_token_len=400)
  flops = pi05.training_flops_per_example
  assert flops(more_cameras) > flops(base)
  assert flops(more_text) > flops(base)
