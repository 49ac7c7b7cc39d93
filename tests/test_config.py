"""Config checks: sizes are positive ints, numbers are finite and positive."""

import math

import pytest

from book.workers.costmodel import Plan
from llmcore.models.gpt import GPTConfig


@pytest.mark.parametrize("bad", [128.0, math.nan, 0, -4, True, "128"])
def test_gpt_sizes_must_be_positive_ints(bad):
    with pytest.raises(ValueError, match="n_embd must be a positive int"):
        GPTConfig(65, 64, 4, 4, bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 2.0])
def test_plan_degrees_refuse_nan_inf_and_floats(bad):
    with pytest.raises(ValueError, match="dp must be a positive int"):
        Plan(dp=bad)
