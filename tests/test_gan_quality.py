"""FID, KID and the class histogram on feature sets whose answers are known; the fixed extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import gan_quality
from training.datasets import FASHION_CLASSES, load_fashion_mnist, to_tensor
from training.gan import Discriminator, Generator


def gaussian(n, d, mean=0.0, std=1.0, seed=0):
    return np.random.default_rng(seed).normal(mean, std, (n, d))


def test_fid_matches_the_closed_form_for_gaussians():
    d = 16
    same = gan_quality.fid(gaussian(20000, d, seed=1), gaussian(20000, d, seed=2))
    assert 0 <= same < 0.05
    # N(0, I) vs N(1, 4I): |mu_a - mu_b|^2 + tr(I + 4I - 2 * 2I) = d + d
    shifted = gan_quality.fid(gaussian(20000, d, seed=1), gaussian(20000, d, mean=1.0, std=2.0, seed=2))
    assert shifted == pytest.approx(2 * d, rel=0.03)


def test_kid_is_unbiased_near_zero_and_grows_with_the_gap():
    a, b = gaussian(2000, 16, seed=1), gaussian(2000, 16, seed=2)
    near, near_std = gan_quality.kid(a, b, subsets=20, subset_size=500)
    far, _ = gan_quality.kid(a, gaussian(2000, 16, mean=0.5, seed=3), subsets=20, subset_size=500)
    assert abs(near) < 3 * near_std + 1e-3
    assert far > 10 * max(abs(near), near_std)


def test_histogram_shows_mode_collapse():
    rng = np.random.default_rng(0)
    balanced = np.eye(10)[rng.integers(0, 10, 5000)] * 0.95 + 0.005
    collapsed = np.eye(10)[np.where(rng.random(5000) < 0.9, 8, rng.integers(0, 10, 5000))] * 0.6 + 0.04
    fair = gan_quality.class_histogram(balanced, FASHION_CLASSES)
    skewed = gan_quality.class_histogram(collapsed, FASHION_CLASSES)
    assert fair["normalised_entropy"] > 0.99 and fair["confident_share"] == 1.0
    assert skewed["counts"]["Bag"] > 4500 and skewed["max_class_share"] > 0.9
    assert skewed["normalised_entropy"] < 0.5 and skewed["confident_share"] == 0.0
    assert sum(skewed["counts"].values()) == skewed["images"] == 5000


def test_the_fixed_extractor_is_the_file_its_card_describes():
    card = json.loads(gan_quality.EXTRACTOR_CARD.read_text())
    assert gan_quality.EXTRACTOR.stat().st_size < 5_000_000
    model = gan_quality.load_extractor()
    images, labels = load_fashion_mnist("test")
    accuracy = gan_quality.evaluate(model, images, labels)
    assert accuracy == pytest.approx(card["test_accuracy"], abs=1e-4) and accuracy > 0.9
    info = gan_quality.extractor_info()
    assert info["file"] == "training/assets/fashion_cnn.pt" and len(info["sha256"]) == 64


def test_real_images_score_far_better_than_noise():
    model = gan_quality.load_extractor()
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    f_train, _ = gan_quality.embed(model, to_tensor(train[:2000]))
    f_test, p_test = gan_quality.embed(model, to_tensor(test[:2000]))
    noise = torch.rand(2000, 1, 28, 28) * 2 - 1
    f_noise, _ = gan_quality.embed(model, noise)
    floor, ceiling = gan_quality.fid(f_train, f_test), gan_quality.fid(f_noise, f_test)
    assert floor * 20 < ceiling
    # other sizes and RGB are converted to the extractor's 28x28 greyscale
    f_rgb, _ = gan_quality.embed(model, to_tensor(np.repeat(test[:8], 3, axis=3)))
    np.testing.assert_allclose(f_rgb, f_test[:8], atol=1e-4)
    assert gan_quality.embed(model, torch.zeros(3, 3, 64, 64))[0].shape == (3, 128)
    assert gan_quality.class_histogram(p_test, FASHION_CLASSES)["normalised_entropy"] > 0.98


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 1), (64, 3), (64, 1)])
def test_dcgan_shapes_for_every_supported_size(size, channels):
    g, d = Generator(100, 8, channels, size), Discriminator(channels, 8, size)
    images = g(torch.randn(5, 100, 1, 1))
    assert images.shape == (5, channels, size, size) and images.abs().max() <= 1
    assert d(images).shape == (5,)
