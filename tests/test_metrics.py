"""Tests for optin_onnx.metrics: KL divergence, cosine similarity, top-1 agreement."""
from __future__ import annotations

import math

import numpy as np
import pytest

from optin_onnx.errors import OptinError
from optin_onnx.metrics import cosine_similarity, kl_divergence, top1_agreement


def test_kl_identical_is_zero():
    logits = np.random.default_rng(1).standard_normal((8, 10)).astype(np.float32)
    assert kl_divergence(logits, logits) == 0.0


def test_kl_matches_hand_computed_value():
    # Sample 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Sample 1: identical, KL = 0. The mean over samples is 1/4 ln(4/3).
    teacher = np.log([[0.5, 0.5], [0.2, 0.8]])
    student = np.log([[0.25, 0.75], [0.2, 0.8]])
    assert kl_divergence(teacher, student) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-12)
    # Softmax is shift-invariant, so adding a constant to the logits changes nothing.
    assert kl_divergence(teacher + 7.0, student - 3.0) == pytest.approx(0.25 * math.log(4 / 3))


def test_kl_is_stable_for_large_logits():
    teacher = np.array([[1000.0, 0.0]], np.float32)
    student = np.array([[0.0, 1000.0]], np.float32)
    value = kl_divergence(teacher, student)
    assert math.isfinite(value) and value == pytest.approx(1000.0)


def test_kl_per_token_logits_average_over_all_positions():
    teacher = np.log(np.array([[[0.5, 0.5], [0.2, 0.8]]]))  # (batch 1, 2 tokens, 2 classes)
    student = np.log(np.array([[[0.25, 0.75], [0.2, 0.8]]]))
    assert kl_divergence(teacher, student) == pytest.approx(0.25 * math.log(4 / 3))


def test_cosine_identical_and_orthogonal():
    a = np.random.default_rng(2).standard_normal((4, 3, 5))
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert cosine_similarity(a, 3.0 * a) == pytest.approx(1.0)
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([[0.0, 5.0], [-1.0, 0.0]])
    assert cosine_similarity(x, y) == pytest.approx(0.0)
    # Mean over rows: one identical row (1) and one opposite row (-1).
    assert cosine_similarity(x, np.array([[1.0, 0.0], [0.0, -2.0]])) == pytest.approx(0.0)
    assert cosine_similarity(x, np.array([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(
        (1 + 1 / math.sqrt(2)) / 2
    )


def test_cosine_zero_vectors():
    zeros = np.zeros((1, 3))
    assert cosine_similarity(zeros, zeros) == 1.0
    assert cosine_similarity(zeros, np.ones((1, 3))) == 0.0


def test_top1_agreement():
    teacher = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    student = np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.9, 0.1]])
    assert top1_agreement(teacher, student) == pytest.approx(0.75)


def test_fidelity_shape_mismatch_is_an_optin_error():
    with pytest.raises(OptinError, match="kl_divergence"):
        kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(OptinError, match="cosine_similarity"):
        cosine_similarity(np.zeros((2, 3)), np.zeros((3, 2)))
