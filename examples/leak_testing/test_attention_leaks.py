"""Testing your modules for leaks: a complete pytest + hypothesis example.

Run it with the plugin that installing poolscope registers:

    pytest examples/leak_testing --poolscope-leak-check

``test_clean_attention`` passes. ``test_leaky_attention`` fails on purpose:
``LeakyAttention`` keeps its scores in a cache, and the message names the
block, its shape and dtype, and the line that allocated it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import poolscope
from poolscope.testing import assert_no_leaks


class Attention(nn.Module):
    """Plain scaled dot-product attention with a pooled, zero-initialised score buffer."""

    @poolscope.pooled_forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(q.shape[0], q.shape[1], k.shape[1])
        scores.baddbmm_(q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
        return scores.softmax(-1) @ v


class LeakyAttention(Attention):
    """The same, but it remembers the last scores: a pooled tensor outlives every call."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: list[torch.Tensor] = []

    @poolscope.pooled_forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(q.shape[0], q.shape[1], k.shape[1])
        self.cache.append(scores)  # the leak
        scores.baddbmm_(q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
        return scores.softmax(-1) @ v


# The modules outlive each test, as a model shared by a test session does.
ATTENTION = Attention()
LEAKY = LeakyAttention()
lengths = st.sampled_from([256, 512, 1024])


@settings(max_examples=5, deadline=None)
@given(length=lengths)
def test_clean_attention(length: int) -> None:
    q = k = v = torch.randn(2, length, 32)
    ATTENTION(q, k, v)


@settings(max_examples=5, deadline=None)
@given(length=lengths)
def test_leaky_attention(length: int) -> None:
    q = k = v = torch.randn(2, length, 32)
    LEAKY(q, k, v)


def test_clean_attention_explicitly() -> None:
    """Without the plugin: the context manager does the same check."""
    q = k = v = torch.randn(2, 1024, 32)
    with assert_no_leaks():
        ATTENTION(q, k, v)
