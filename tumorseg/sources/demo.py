"""The synthetic demo set: MRI-like slices with exact tumour masks, drawn from a seed, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tumorseg.sources.output import staging_folder, write_metadata

DEMO_CLASSES = ("meningioma", "glioma", "pituitary")
# Below 24 px the smallest tumour make_demo_slice draws (radius 0.04 x wobble 0.75, squeezed
# 1.3x) can fall between pixel centres, leaving an empty mask; from 24 px every slice has one.
DEMO_MIN_SIZE = 24


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: coarse random grid upsampled bilinearly."""
    coarse = rng.random((scale, scale)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def make_demo_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic T1-like slice (uint8) and its exact tumour mask (uint8, 0/255).

    A bright skull ring around textured brain tissue, plus one lobulated
    tumour blob that is brighter than the tissue around it, so a segmenter
    has to learn shape and contrast rather than a global threshold.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ry, rx = rng.uniform(0.36, 0.44), rng.uniform(0.30, 0.38)
    head = (yy / ry) ** 2 + (xx / rx) ** 2
    brain = head < 0.85
    skull = (head >= 0.85) & (head < 1.0)

    image = np.zeros((size, size), np.float32)
    image[brain] = 0.35 + 0.25 * _smooth_noise(rng, size, 8)[brain]
    image[skull] = 0.85

    # Tumour: an ellipse whose radius wobbles with angle, placed inside the brain.
    cy, cx = rng.uniform(-0.18, 0.18), rng.uniform(-0.15, 0.15)
    radius = rng.uniform(0.04, 0.12)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.3)) * rng.uniform(0.2, 1.0)
    tumour = (np.hypot(yy - cy, (xx - cx) * rng.uniform(0.7, 1.3)) < radius * wobble) & brain
    image[tumour] = 0.7 + 0.2 * _smooth_noise(rng, size, 16)[tumour]

    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    image_u8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return image_u8, tumour.astype(np.uint8) * 255


def make_demo_dataset(out: Path, count: int = 240, size: int = 128, seed: int = 0,
                      slices_per_patient: int = 6) -> Path:
    """Write `count` synthetic slices to `out` (images/, masks/, metadata.csv).

    Deterministic for a given seed. Consecutive slices share a `patient_id`
    so grouped splits can be exercised on the demo set too.
    """
    rng = np.random.default_rng(seed)
    with staging_folder(out) as staging:
        rows = []
        for index in range(count):
            image, mask = make_demo_slice(rng, size)
            stem = f"demo_{index:04d}"
            Image.fromarray(image).save(staging / "images" / f"{stem}.png")
            Image.fromarray(mask).save(staging / "masks" / f"{stem}.png")
            patient = index // slices_per_patient
            rows.append({"image_id": stem, "patient_id": f"p{patient:03d}",
                         "tumor_class": DEMO_CLASSES[patient % len(DEMO_CLASSES)]})
        write_metadata(staging / "metadata.csv", ["image_id", "patient_id", "tumor_class"], rows)
    return out
