"""Fixtures of the learner tests."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture
def make_learner(tiny_qwen2):
    """Build learners; ZeRO engines are released at the end of each test."""
    from medrl.align.learner import Learner

    made = []

    def make(model_dir=None, **kwargs):
        kwargs.setdefault("micro_batch_size", 4)
        kwargs.setdefault("lr", 1e-3)
        learner = Learner(model_dir or tiny_qwen2, **kwargs)
        made.append(learner)
        return learner

    yield make
    made.clear()
    gc.collect()
