"""Value types: the ``--precisions`` parser shared by ``inspect`` and ``search``."""

from __future__ import annotations

import pytest

from amp_search.errors import UserInputError
from amp_search.types import Precision, parse_precisions

FP16, BF16 = Precision.FP16, Precision.BF16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fp16", (FP16,)),
        ("bf16", (BF16,)),
        ("fp16,bf16", (FP16, BF16)),
        ("bf16,fp16", (FP16, BF16)),  # any order, normalized
        (" BF16 , fp16 ", (FP16, BF16)),
    ],
)
def test_parse_precisions_accepts_fp16_and_bf16_in_any_order(text, expected):
    assert parse_precisions(text) == expected


@pytest.mark.parametrize("text", ["fp8", "fp32", "", "fp16,", "fp16,fp16", "fp16;bf16", "int8"])
def test_parse_precisions_refuses_anything_else_in_one_line(text):
    with pytest.raises(UserInputError) as info:
        parse_precisions(text)
    message = str(info.value)
    assert "\n" not in message and repr(text) in message
    assert "fp16, bf16 or fp16,bf16" in message
    assert info.value.exit_code == 2
