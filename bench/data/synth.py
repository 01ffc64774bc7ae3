"""The embedded default dataset: an ImageFolder of JPEGs that cost what photos cost.

Each image is coloured 1/f noise (power ~ 1/f^beta, the spectrum of natural images) with
occluding shapes for hard edges, saved at ImageNet-like size (~400-500 x 333-375 px, quality 90,
~110 KB). A class is a colour tint and a texture orientation, both with per-image jitter, so a
small CNN can learn it through random-resized-crop + flip, but not from one pixel.
Deterministic for a seed: every image has its own seed from (seed, split, class, index).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loaders.contract import LoaderError
from loaders.stored import temp_output

from ..errors import BenchError
from .parallel import pool_map

MANIFEST = "synth.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SynthSpec:
    classes: int = 10
    train_per_class: int = 160
    val_per_class: int = 40
    width: int = 500  # largest side; each image draws its own size below it
    height: int = 375
    quality: int = 90
    beta: float = 1.6  # ~106 KB mean at ~450x350, q90 (ImageNet train: ~110 KB)
    seed: int = 0
    version: int = 1  # of render(): bump when it changes, so caches regenerate

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def count(self, split: str) -> int:
        return self.classes * (self.train_per_class if split == "train" else self.val_per_class)


class SynthError(BenchError):
    pass


def _noise(rng: np.random.Generator, h: int, w: int, beta: float, angle: float, aniso: float) -> np.ndarray:
    """Zero-mean, unit-std noise with power spectrum ~ 1/f^beta, stretched along ``angle``."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    u = fx * np.cos(angle) + fy * np.sin(angle)
    v = -fx * np.sin(angle) + fy * np.cos(angle)
    f = np.sqrt((u * aniso) ** 2 + (v / aniso) ** 2)
    amp = np.maximum(f, 1.0 / max(h, w)) ** (-beta / 2)
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    x = np.fft.irfft2(spec, s=(h, w))
    return ((x - x.mean()) / (x.std() + 1e-8)).astype(np.float32)


def render(spec: SynthSpec, split: str, cls: int, idx: int) -> bytes:
    """One JPEG, fully determined by (spec, split, cls, idx)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), cls, idx])
    w = int(rng.integers(int(spec.width * 0.8), spec.width + 1))
    h = int(rng.integers(int(spec.height * 0.89), spec.height + 1))
    if rng.random() < 0.2:  # some portrait images, as in photo collections
        w, h = h, w
    # Class cues: texture orientation (mod 180 deg, so a flip maps class c to a near neighbour only
    # in orientation, colour still separates them) and chroma tint, each jittered per image.
    angle = np.pi * (cls + rng.normal(0, 0.2)) / spec.classes
    hue = 2 * np.pi * (cls + rng.normal(0, 0.3)) / spec.classes
    lum = _noise(rng, h, w, spec.beta, angle, aniso=1.8)
    chroma_a = _noise(rng, h, w, spec.beta + 0.4, 0.0, 1.0)
    chroma_b = _noise(rng, h, w, spec.beta + 0.4, 0.0, 1.0)
    # Occluding shapes (a dead-leaves touch): hard edges at many scales, texture kept inside.
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    n_shapes = int(rng.integers(6, 14))
    for k in range(1, n_shapes + 1):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.3) * min(w, h)
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=k)
        else:
            pts = [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in np.sort(rng.uniform(0, 2 * np.pi, 5))]
            draw.polygon(pts, fill=k)
    offsets = np.concatenate([[0.0], rng.normal(0, 0.9, n_shapes)]).astype(np.float32)
    lum = lum + offsets[np.asarray(mask)]
    a = 0.4 * chroma_a + 0.3 * np.cos(hue)
    b = 0.4 * chroma_b + 0.3 * np.sin(hue)
    # Opponent colour space -> RGB.
    rgb = np.stack([lum + 0.9 * a, lum - 0.45 * a + 0.78 * b, lum - 0.45 * a - 0.78 * b], axis=-1)
    pixels = np.clip(118 + 42 * rgb, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=spec.quality)
    return buf.getvalue()


def _write_one(args) -> tuple[int, int, int]:
    spec, root, split, cls, idx = args
    data = render(spec, split, cls, idx)
    path = Path(root) / split / f"c{cls:03d}" / f"c{cls:03d}_{idx:06d}.jpg"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as im:
        return len(data), im.width, im.height


def is_complete(out: Path, spec: SynthSpec) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("spec") == asdict(spec)
    except (OSError, ValueError):
        return False


def generate(
    out: Path | str, spec: SynthSpec = SynthSpec(), workers: int | None = None, progress: bool = True
) -> dict:
    """Write the dataset to ``out`` (train/ and val/ ImageFolders plus a manifest).

    Written into a temporary sibling folder and renamed at the end: ``out`` either holds a
    complete dataset with its manifest or does not exist.
    """

    out = Path(out)
    if is_complete(out, spec):
        return json.loads((out / MANIFEST).read_text())
    if out.exists():
        raise SynthError(f"{out} exists and is not this generated dataset; remove it or choose another --out")
    for name, value in asdict(spec).items():
        if name not in ("beta", "seed") and value < 1:
            raise SynthError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if spec.width < 32 or spec.height < 32 or not 1 <= spec.quality <= 100:
        raise SynthError("width/height must be >= 32 and quality within 1..100")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with temp_output(out) as tmp:
            tasks = []
            for split in SPLITS:
                per_class = spec.train_per_class if split == "train" else spec.val_per_class
                for cls in range(spec.classes):
                    (tmp / split / f"c{cls:03d}").mkdir(parents=True)
                    tasks += [(spec, str(tmp), split, cls, i) for i in range(per_class)]
            start = time.perf_counter()
            stats = pool_map(_write_one, tasks, f"generating {out.name}", workers, progress)
            sizes, widths, heights = (np.array(col) for col in zip(*stats))
            manifest = {
                "kind": "loaderbench generated ImageFolder",
                "spec": asdict(spec),
                "images": {split: spec.count(split) for split in SPLITS},
                "mean_bytes": float(sizes.mean()),
                "mean_width": float(widths.mean()),
                "mean_height": float(heights.mean()),
                "total_bytes": int(sizes.sum()),
                "seconds": round(time.perf_counter() - start, 2),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            try:
                os.rename(tmp, out)
            except OSError:
                if not is_complete(out, spec):  # not another process finishing the same set first
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except LoaderError as exc:  # a full disk, in one line naming ``out``
        raise SynthError(str(exc)) from exc
    return manifest


def cache_root() -> Path:
    return Path(os.environ.get("LOADERBENCH_CACHE", Path.home() / ".cache" / "loaderbench"))


def default_dataset_path(spec: SynthSpec = SynthSpec()) -> Path:
    return cache_root() / f"synth-{spec.key()}"


def default_dataset(spec: SynthSpec = SynthSpec(), progress: bool = True) -> Path:
    """The generated dataset for ``spec`` in the cache, generated on first use."""
    out = default_dataset_path(spec)
    generate(out, spec, progress=progress)
    return out
