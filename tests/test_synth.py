"""The generated default dataset: deterministic, photo-like in cost, atomic, cached, learnable."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from bench.data.synth import MANIFEST, SynthError, SynthSpec, default_dataset, generate, render

from .conftest import bench


def digest(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = SynthSpec(classes=2, train_per_class=3, val_per_class=1, width=120, height=90)
    a = generate(tmp_path / "a", spec, workers=2, progress=False)
    generate(tmp_path / "b", spec, workers=1, progress=False)  # worker count must not matter
    generate(tmp_path / "c", SynthSpec(**{**spec.__dict__, "seed": 1}), progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert a["images"] == {"train": 6, "val": 2}
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == ["c000", "c001"]


def test_default_images_cost_what_imagenet_photos_cost():
    """ImageNet train: ~110 KB mean at ~400-500 x 333-375 px, q~90. A sample of default images
    must land near that: neither flat colours (tiny files) nor white noise (huge files)."""
    spec = SynthSpec()
    sizes, dims = [], []
    for cls in range(0, spec.classes, 3):
        for idx in range(3):
            data = render(spec, "train", cls, idx)
            sizes.append(len(data))
            with Image.open(__import__("io").BytesIO(data)) as im:
                dims.append(im.size)
    assert 70e3 < np.mean(sizes) < 160e3, np.mean(sizes)
    long_side = [max(d) for d in dims]
    short_side = [min(d) for d in dims]
    assert 400 <= np.mean(long_side) <= 500 and 300 <= np.mean(short_side) <= 375


def test_content_is_textured_not_flat_or_white_noise():
    """1/f content: most energy at low frequencies (not white noise), yet real variation."""
    import io

    img = np.asarray(
        Image.open(io.BytesIO(render(SynthSpec(), "train", 0, 0))).convert("L"), dtype=np.float64
    )
    assert img.std() > 20  # not flat
    power = np.abs(np.fft.rfft2(img - img.mean())) ** 2
    fy = np.abs(np.fft.fftfreq(img.shape[0]))[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    f = np.hypot(fx, fy)
    band = (f > 0.01) & (f < 0.4)
    slope = np.polyfit(np.log(f[band]), np.log(power[band] + 1e-9), 1)[0]
    # Natural images: power ~ 1/f^2 roughly (slope -2); white noise: slope 0.
    assert -2.5 < slope < -1.2, slope


def test_output_is_atomic_and_existing_folders_are_refused(tmp_path):
    spec = SynthSpec(classes=2, train_per_class=2, val_per_class=1, width=64, height=48)
    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(SynthError, match="exists and is not this generated dataset"):
        generate(out, spec, progress=False)
    assert (out / "mine.txt").read_text() == "user data"
    # An interrupted generation leaves only a hidden temporary, never `out` itself.
    calls = {"n": 0}

    import bench.data.synth as synth

    real = synth.json.dumps

    def boom(*a, **k):  # fail at the very end, just before the manifest is written
        calls["n"] += 1
        raise KeyboardInterrupt

    synth.json.dumps = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(tmp_path / "new", spec, progress=False)
    finally:
        synth.json.dumps = real
    assert calls["n"] == 1
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new.tmp-*"))
    m = generate(tmp_path / "new", spec, progress=False)  # a re-run starts cleanly
    assert json.loads((tmp_path / "new" / MANIFEST).read_text()) == m


def test_default_dataset_is_generated_once_and_reused(tmp_cache):
    spec = SynthSpec(classes=2, train_per_class=2, val_per_class=1, width=64, height=48)
    first = default_dataset(spec, progress=False)
    stamp = (first / MANIFEST).stat().st_mtime_ns
    assert default_dataset(spec, progress=False) == first
    assert (first / MANIFEST).stat().st_mtime_ns == stamp
    assert first.parent == tmp_cache


def test_cli_flags_and_bad_values(tmp_path):
    out = bench(
        "data",
        "synth",
        "--out",
        str(tmp_path / "s"),
        "--classes",
        "3",
        "--train-per-class",
        "2",
        "--val-per-class",
        "1",
        "--width",
        "80",
        "--height",
        "60",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "s" / "train").rglob("*.jpg"))) == 6
    bad = bench("data", "synth", "--out", str(tmp_path / "t"), "--classes", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "--classes must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_classes_are_learnable(small_data, tmp_path):
    """A few CPU epochs of the small CNN reach well above chance (25% for 4 classes)."""
    out = bench(
        "run",
        "--data",
        str(small_data),
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--image-size",
        "64",
        "--lr",
        "0.1",
        "--workers",
        "0",
        "--out",
        str(tmp_path),
        cwd=tmp_path,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("*.json")
    acc = json.loads(path.read_text())["metrics"]["final_val_accuracy"]
    assert acc >= 0.6, f"val accuracy {acc:.2f} after 4 epochs (chance 0.25)"
