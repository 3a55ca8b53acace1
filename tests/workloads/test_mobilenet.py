"""idkm_plugin.workloads.mobilenet: the MobileNetV2 layout's block features and the offline image sources."""
import pytest
import torch

from idkm_plugin.workloads.mobilenet import MobileNetV2, logits_and_features, sample_images


def test_features_follow_the_blocks():
    model = MobileNetV2().eval()
    x = torch.randn(1, 3, 64, 64)
    logits, features = logits_and_features(model, x)
    assert torch.equal(logits, model(x)) and len(features) == len(model.features)
    assert features[-1].shape == (1, 1280, 2, 2)


def test_photos_add_scikit_image_photographs_as_rgb():
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    pytest.importorskip("skimage")
    sklearn_only, photos = sample_images("sklearn"), sample_images("photos")
    assert len(sklearn_only) == 2 and len(photos) == 11
    assert all(im.shape[0] == 3 and 0 <= float(im.min()) and float(im.max()) <= 1 for im in photos)
    assert all(torch.equal(a, b) for a, b in zip(sklearn_only, photos))
    with pytest.raises(ValueError, match="source='imagenet'"):
        sample_images("imagenet")
