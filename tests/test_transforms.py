"""THE preprocessing: one output for files and arrays, per-model statistics; augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdcore.config import IMAGENET_MEAN, IMAGENET_STD, OFFLINE, PAPER, AugmentConfig, PreprocessConfig
from kdcore.data import resize_all
from kdcore.engine import build_view_bank
from kdcore.imaging import read_grey_image
from kdcore.transforms import Preprocess, UltrasoundAugment


def test_output_shape_dtype_and_grey_replicated_to_three_channels(speckle_image):
    out = Preprocess(PreprocessConfig())(speckle_image)  # 300 x 400 in
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out[0], out[1]) is False  # different mean/std per channel...
    # ...but the same grey image underneath every channel.
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    grey = out * std + mean
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[0], grey[2], atol=1e-5)


def test_normalisation_uses_each_models_mean_and_std():
    flat = np.full((50, 70), 128, dtype=np.uint8)
    student = Preprocess(OFFLINE.student_preprocess)(flat)
    for c in range(3):
        expected = (128 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(student[c], torch.tensor(expected), atol=1e-6)
    # The hybrid teacher takes [0, 1] input and normalises each branch itself.
    teacher = Preprocess(OFFLINE.teacher_preprocess)(flat)
    assert torch.allclose(teacher, torch.tensor(128 / 255), atol=1e-6)
    assert PAPER.student_preprocess.mean == IMAGENET_MEAN and PAPER.student_preprocess.std == IMAGENET_STD
    extremes = Preprocess(OFFLINE.teacher_preprocess)(np.array([[0, 255] * 20] * 40, dtype=np.uint8))
    assert extremes.min().item() == pytest.approx(0.0) and extremes.max().item() == pytest.approx(1.0)


def test_file_and_array_give_identical_tensors(tmp_path, speckle_image):
    preprocess = Preprocess(PreprocessConfig())
    from_array = preprocess(speckle_image)
    grey_png, rgb_png = tmp_path / "grey.png", tmp_path / "rgb.png"
    Image.fromarray(speckle_image).save(grey_png)
    Image.fromarray(np.stack([speckle_image] * 3, axis=-1)).save(rgb_png)  # BUSI's RGB-stored greys
    assert torch.equal(preprocess(read_grey_image(grey_png)), from_array)
    assert torch.equal(preprocess(read_grey_image(rgb_png)), from_array)
    assert torch.equal(preprocess(read_grey_image(grey_png.read_bytes())), from_array)


def test_training_cache_path_equals_serving_path(tmp_path, speckle_image):
    """Training caches resized uint8 images and normalises later; it must equal the app's path."""
    Image.fromarray(speckle_image).save(tmp_path / "a.png")
    preprocess = Preprocess(OFFLINE.student_preprocess)
    cached = resize_all([read_grey_image(tmp_path / "a.png")], preprocess.cfg.input_size)
    assert cached.shape == (1, 1, 224, 224) and cached.dtype == torch.uint8
    assert torch.equal(preprocess.normalize(cached)[0], preprocess(read_grey_image(tmp_path / "a.png")))


def test_other_input_sizes_follow_the_config(speckle_image):
    out = Preprocess(PreprocessConfig(input_size=96))(speckle_image)
    assert out.shape == (3, 96, 96)
    tiny = np.random.default_rng(0).integers(0, 255, (40, 30), dtype=np.uint8)  # upscaled
    assert Preprocess(PreprocessConfig())(tiny).shape == (3, 224, 224)


def test_augment_keeps_shape_and_dtype_and_changes_pixels(speckle_image):
    small = Preprocess(PreprocessConfig()).resize(speckle_image)
    augment = UltrasoundAugment(AugmentConfig(), 224)
    torch.manual_seed(0)
    out = augment(small)
    assert out.shape == small.shape == (1, 224, 224)
    assert out.dtype == torch.uint8
    assert not torch.equal(out, small)
    assert (out.float() - small.float()).abs().mean() > 1.0


def test_augment_is_reproducible_under_a_seed(speckle_image):
    small = Preprocess(PreprocessConfig()).resize(speckle_image)
    augment = UltrasoundAugment(AugmentConfig(), 224)
    torch.manual_seed(7)
    first = [augment(small) for _ in range(3)]
    torch.manual_seed(7)
    second = [augment(small) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_speckle_only_augment_is_multiplicative_noise(speckle_image):
    framed = speckle_image.copy()
    framed[:60] = 0  # the black frame around a B-mode sector
    small = Preprocess(PreprocessConfig()).resize(framed)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, rotate_degrees=0.0)
    cfg = AugmentConfig(**{**cfg.__dict__, "brightness": 0.0, "contrast": 0.0, "speckle_sigma": 0.1})
    torch.manual_seed(0)
    out = UltrasoundAugment(cfg, 224)(small)
    black = small == 0
    assert black.any() and (out[black] == 0).all()  # multiplicative: black stays black
    assert not torch.equal(out, small)


def test_view_bank_is_seeded_and_keeps_the_plain_image_first(speckle_image):
    small = Preprocess(PreprocessConfig(input_size=64)).resize(speckle_image)
    images = torch.stack([small, 255 - small])
    augment = UltrasoundAugment(AugmentConfig(), 64)
    labels = torch.tensor([0, 2])
    bank = build_view_bank(images, labels, augment, views=3, seed=5).views
    assert bank.shape == (2, 3, 1, 64, 64) and bank.dtype == torch.uint8
    assert torch.equal(bank[:, 0], images)
    assert torch.equal(bank, build_view_bank(images, labels, augment, views=3, seed=5).views)
    assert not torch.equal(bank, build_view_bank(images, labels, augment, views=3, seed=6).views)


def test_mixup_views_blend_two_images_and_their_targets(speckle_image):
    small = Preprocess(PreprocessConfig(input_size=64)).resize(speckle_image)
    images = torch.stack([torch.zeros_like(small), torch.full_like(small, 200)])  # black and grey
    no_change = UltrasoundAugment(
        AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, rotate_degrees=0.0,
                      brightness=0.0, contrast=0.0, speckle_sigma=0.0), 64,
    )  # fmt: skip
    bank = build_view_bank(images, torch.tensor([0, 1]), no_change, views=2, seed=0, mixup_views=3)
    assert bank.views.shape == (2, 5, 1, 64, 64) and bank.targets.shape == (2, 5, 3)
    assert torch.equal(bank.targets[0, :2], torch.tensor([[1.0, 0, 0]] * 2))  # plain views: one-hot
    for i in range(2):
        for v in range(2, 5):
            weight_on_self = bank.targets[i, v, i].item()
            assert 0.5 <= weight_on_self <= 1.0 and bank.targets[i, v].sum().item() == pytest.approx(1.0)
            other = 1 - i
            expected = round(200 * (weight_on_self if i == 1 else 1 - weight_on_self))
            assert abs(int(bank.views[i, v, 0, 0, 0]) - expected) <= 1  # the pixels mix as the targets do
            assert bank.targets[i, v, other].item() == pytest.approx(1 - weight_on_self, abs=1e-6)


def test_lesion_masks_move_with_their_views(speckle_image):
    size = 64
    small = Preprocess(PreprocessConfig(input_size=size)).resize(speckle_image)
    mask = torch.zeros_like(small)
    mask[:, 10:30, 5:25] = 1
    image = small.clone()
    image[mask.bool()] = 255  # the lesion is the only white area
    augment = UltrasoundAugment(AugmentConfig(brightness=0.0, contrast=0.0, speckle_sigma=0.0), size)
    bank = build_view_bank(image[None], torch.tensor([1]), augment, views=6, seed=3, masks=mask[None], mixup_views=2)
    assert bank.masks.shape == bank.views.shape
    for v in range(6):
        moved, view = bank.masks[0, v].bool(), bank.views[0, v]
        assert moved.any() and view[moved].float().mean() > 200  # the mask still covers the white lesion
        assert view[~moved].float().mean() < 150
    assert not bank.masks[0, 6:].any()  # mixup views carry no mask
