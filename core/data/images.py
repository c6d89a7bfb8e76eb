"""Offline images for vision encoders: calibration crops and labelled evaluation sets.

Calibration: random resized crops + horizontal flips of scikit-image's ~24 sample photographs and
test images (astronaut, coffee, chelsea, rocket, hubble_deep_field, ...), deterministic by seed.
Evaluation (labelled, never calibrated on): scikit-learn's ``load_digits`` (1797 8×8 digits, 10
classes) and scikit-image's ``lfw_subset`` (100 faces + 100 non-faces, 25×25), upsampled; a
stratified, seeded train/test split for kNN and linear probes.

All images are uint8 tensors (N, 3, H, W); :class:`core.encoders.ImagePreprocess` normalises them.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from core.errors import DataError

# scikit-image sample images that ship inside the wheel (no download)
SAMPLE_IMAGES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
                 "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                 "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")
LABELLED_SETS = ("digits", "lfw")


def _to_uint8_rgb(array) -> torch.Tensor:
    """A numpy image (H, W), (H, W, 3) or (H, W, 4), bool / uint8 / float in [0, 1] → uint8 (3, H, W)."""
    x = torch.from_numpy(array.copy())
    if x.dtype == torch.bool:
        x = x.to(torch.uint8) * 255
    elif x.is_floating_point():
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.dim() == 2:
        x = x.unsqueeze(-1).expand(*x.shape, 3)
    return x[..., :3].permute(2, 0, 1).contiguous()


@functools.cache
def sample_images() -> tuple[torch.Tensor, ...]:
    """scikit-image's sample images as uint8 (3, H, W) tensors, in :data:`SAMPLE_IMAGES` order."""
    import skimage.data

    return tuple(_to_uint8_rgb(getattr(skimage.data, name)()) for name in SAMPLE_IMAGES)


def random_crops(images: list[torch.Tensor] | tuple[torch.Tensor, ...], count: int, size: int = 224, seed: int = 0,
                 scale: tuple[float, float] = (0.2, 1.0), flip: bool = True) -> torch.Tensor:
    """``count`` random resized crops (area fraction in ``scale``, aspect 3/4–4/3) of uint8 (3, H, W)
    images, each resized to size×size and flipped with probability ½: uint8 (count, 3, size, size).
    Deterministic by ``seed``."""
    if count < 1:
        raise DataError(f"The number of images must be at least 1 (got {count}).")
    if size < 14:
        raise DataError(f"Image size must be at least 14 pixels (got {size}).")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise DataError(f"Crop scale must satisfy 0 < low <= high <= 1 (got {scale}).")
    rng = torch.Generator().manual_seed(int(seed))
    out = torch.empty((count, 3, size, size), dtype=torch.uint8)
    for i in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=rng))]
        _, height, width = image.shape
        area = height * width * float(torch.empty(1).uniform_(*scale, generator=rng))
        aspect = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=rng)))
        w = max(1, min(width, round(math.sqrt(area * aspect))))
        h = max(1, min(height, round(math.sqrt(area / aspect))))
        top = int(torch.randint(height - h + 1, (1,), generator=rng))
        left = int(torch.randint(width - w + 1, (1,), generator=rng))
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()  # (1, 3, h, w)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if flip and bool(torch.rand(1, generator=rng) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0].round().clamp(0, 255).to(torch.uint8)
    return out


def calibration_images(count: int = 64, size: int = 224, seed: int = 0,
                       scale: tuple[float, float] = (0.2, 1.0)) -> torch.Tensor:
    """Calibration crops of the scikit-image samples: uint8 (count, 3, size, size)."""
    return random_crops(sample_images(), count, size, seed, scale)


def heldout_images(count: int = 32, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Crops for the adaptive search, drawn with a generator disjoint from :func:`calibration_images`'
    (fixed crops, no per-evaluation augmentation: AMP's DINOv2 search re-augmented and was noisy)."""
    return random_crops(sample_images(), count, size, seed + 1_000_003)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


@functools.cache
def _labelled_raw(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = torch.from_numpy(digits.images / 16.0).float()  # (1797, 8, 8) in [0, 1]
        labels = torch.from_numpy(digits.target).long()
    elif name == "lfw":
        import skimage.data

        gray = torch.from_numpy(skimage.data.lfw_subset()).float()  # (200, 25, 25) in [0, 1]
        labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()  # 100 faces, then 100 non-faces
    else:
        raise DataError(f"Unknown labelled image set '{name}'; choose one of: {', '.join(LABELLED_SETS)}.")
    images = (gray.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1)
    return images.contiguous(), labels


def labelled_images(name: str = "digits", size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled set upsampled to size×size: (uint8 (N, 3, size, size), LongTensor (N,))."""
    images, labels = _labelled_raw(name)
    return _resize(images, size), labels


def stratified_split(labels: torch.Tensor, test_fraction: float = 0.3,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices): ``test_fraction`` of every class to the test side, seeded."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    rng = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=rng)]
        cut = max(1, round(test_fraction * members.numel()))
        test.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
