"""Fixtures shared by the model tests."""

import jax
import pytest

from ki.model import pi05
from tests.model.tiny import perturbed, tiny_config


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def params(config):
  return perturbed(pi05.init_params(config, jax.random.key(0)), jax.random.key(1))
