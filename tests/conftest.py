"""Shared test set-up: strict rank promotion and the shared data location."""

import os
import pathlib

import jax
import pytest

# Catches query-versus-prototype broadcasting bugs (nanodo's preamble).
jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get('FEWSHOT_SHARED_DATA', REPO.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data`, or a skip when this checkout has none beside it."""
  if not (SHARED_DATA / 'omniglot').is_dir():
    pytest.skip(f'real data not found at {SHARED_DATA} (see README: Data)')
  return SHARED_DATA
