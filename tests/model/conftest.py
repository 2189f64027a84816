"""Fixtures shared by the model tests."""

import pytest

from tests.model.tiny import tiny_config, tiny_params


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def params(config):
  return tiny_params(config)
