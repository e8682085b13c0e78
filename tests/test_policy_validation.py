"""Observation checks of the policy service, without a server."""

import math

import numpy as np
import pytest

from services.policy import validate_observations
from services.runtime.errors import ApiError


def reject(observations, shape=(4,), max_batch=8):
    with pytest.raises(ApiError) as caught:
        validate_observations(observations, list(shape), max_batch)
    return caught.value


def test_good_batches_become_float32():
    batch = validate_observations([[0, 1, 2, 3], [0.5, -1e3, 2, 3]], [4], 8)
    assert batch.dtype == np.float32 and batch.shape == (2, 4)
    assert validate_observations([[[1, 2], [3, 4]]], [2, 2], 8).shape == (1, 2, 2)


@pytest.mark.parametrize("observations, code, field", [
    ([], "invalid_observations", "observations"),
    ("0,1,2,3", "invalid_observations", "observations"),
    ([[0, 1, 2]], "invalid_observation", "observations[0]"),
    ([[0, 1, 2, 3], [0, 1, 2, 3, 4]], "invalid_observation", "observations[1]"),
    ([[0, 1, 2, 3], [0, 1, "2", 3]], "invalid_observation", "observations[1]"),
    ([[0, 1, 2, 3], [0, 1, None, 3]], "invalid_observation", "observations[1]"),
    ([[True, False, True, False]], "invalid_observation", "observations[0]"),
    ([[0, 1, 2, 3], [0, math.nan, 2, 3]], "non_finite_observation", "observations[1]"),
    ([[0, 1, 2, math.inf]], "non_finite_observation", "observations[0]"),
    ([[0, 1, [2], 3]], "invalid_observation", "observations[0]"),
])
def test_bad_observations_name_the_culprit(observations, code, field):
    error = reject(observations)
    assert (error.status, error.code, error.field) == (400, code, field)


def test_batch_limit_is_in_the_message():
    error = reject([[0, 1, 2, 3]] * 9, max_batch=8)
    assert error.code == "batch_too_large" and "limit of 8" in error.message
