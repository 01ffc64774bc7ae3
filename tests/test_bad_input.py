"""Bad input through the command line, as a user meets it: one clear line naming the file or
option, exit status 2, no traceback, and no result file that looks like a success."""

from __future__ import annotations

import json

import pytest

from .conftest import available_backends, bench, copy_tree

RUN = ("run", "--steps", "8", "--warmup-steps", "2", "--batch-size", "8", "--image-size", "32")


def fails_cleanly(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: error"), out.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    return last


def no_results(folder):
    return not folder.exists() or not [p for p in folder.iterdir() if p.suffix == ".json"]


def test_missing_data_folder(tmp_path):
    out = bench(*RUN, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), cwd=tmp_path)
    fails_cleanly(out, str(tmp_path / "nowhere"), "not found")
    assert no_results(tmp_path / "r")


def test_folder_without_train_split(tmp_path):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    out = bench(*RUN, "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "r"), cwd=tmp_path)
    fails_cleanly(out, "train/ and val/")


def test_class_folder_without_images(probe, tmp_path):
    data = copy_tree(probe["root"], tmp_path / "d")
    (data / "train" / "dog").mkdir()
    (data / "train" / "dog" / "notes.txt").write_text("not an image")
    out = bench(*RUN, "--data", str(data), "--out", str(tmp_path / "r"), cwd=tmp_path)
    fails_cleanly(out, str(data / "train" / "dog"), "no images")


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--loader", "nope"), "unknown loader 'nope'"),
        (("--batch-size", "0"), "--batch-size must be >= 1"),
        (("--model", "vgg"), "unknown --model 'vgg'"),
        (("--amp", "fp16", "--device", "cpu"), "--amp fp16 needs CUDA"),
        (("-o", "num_wrokers=2"), "no option(s) num_wrokers"),
        (("-o", "pin_memory=maybe"), "expected true or false"),
        (("--workers", "0", "--prefetch-factor", "2"), "need num_workers >= 1"),
    ],
)
def test_impossible_options(probe, tmp_path, args, needle):
    out = bench(*RUN, "--data", str(probe["root"]), *args, "--out", str(tmp_path / "r"), cwd=tmp_path)
    fails_cleanly(out, needle)
    assert no_results(tmp_path / "r")


def test_more_ranks_than_samples(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "d" / split / "a" / "x.jpg")
    out = bench(
        *RUN, "--data", str(tmp_path / "d"), "--cpu-ranks", "2", "--out", str(tmp_path / "r"), cwd=tmp_path
    )
    fails_cleanly(out, "1 training samples cannot be split over 2 ranks")


def damage(data):
    """One corrupt and one truncated JPEG in train/, one zero-byte file in val/."""
    corrupt = data / "train" / "bee" / "img_008.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    good = sorted((data / "train" / "cat").glob("*.jpg"))[0]
    truncated = data / "train" / "cat" / "zz_truncated.jpg"
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG", quality=90)
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    empty = data / "val" / "ant" / "zz_empty.jpg"
    empty.write_bytes(b"")
    assert good.exists()
    return corrupt, truncated, empty


READERS = [pytest.param(("--workers", "0"), id="torch-w0"), pytest.param(("--workers", "2"), id="torch-w2")]
if "dali" in available_backends():
    READERS.append(pytest.param(("--loader", "dali"), id="dali"))
if "spdl" in available_backends():
    # its FFmpeg stage (its default decodes as torch does, which the torch readers cover)
    READERS.append(pytest.param(("--loader", "spdl", "-o", "decode=ffmpeg"), id="spdl-ffmpeg"))
for name in ("litdata", "mosaic"):  # converted first: the damaged bytes are stored as they are
    if name in available_backends():
        READERS.append(pytest.param(("--loader", name), id=name))
if "ray" in available_backends():  # joins the suite's Ray cluster (RAY_ADDRESS, tests/conftest.py)
    READERS.append(pytest.param(("--loader", "ray"), id="ray"))


@pytest.mark.parametrize("reader", READERS)
def test_bad_image_stops_naming_the_file(probe, tmp_path, reader):
    data = copy_tree(probe["root"], tmp_path / "d")
    corrupt, truncated, _ = damage(data)
    out = bench(*RUN, "--data", str(data), *reader, "--out", str(tmp_path / "r"), cwd=tmp_path)
    last = fails_cleanly(out, "cannot decode", "--on-bad-sample skip")
    assert str(corrupt) in last or str(truncated) in last
    assert no_results(tmp_path / "r")


def test_truncated_jpeg_alone_is_caught(probe, tmp_path):
    data = copy_tree(probe["root"], tmp_path / "d")
    _, truncated, empty = damage(data)
    (data / "train" / "bee" / "img_008.jpg").unlink()
    empty.unlink()
    out = bench(*RUN, "--data", str(data), "--out", str(tmp_path / "r"), cwd=tmp_path)
    fails_cleanly(out, str(truncated))


@pytest.mark.parametrize("reader", READERS[1:])
def test_skip_policy_counts_and_names_what_it_skipped(probe, tmp_path, reader):
    data = copy_tree(probe["root"], tmp_path / "d")
    corrupt, truncated, empty = damage(data)
    out = bench(
        "run",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--warmup-steps",
        "1",
        "--batch-size",
        "11",
        "--image-size",
        "32",
        *reader,
        "--on-bad-sample",
        "skip",
        "--out",
        str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = (tmp_path / "r").glob("*.json")
    result = json.loads(path.read_text())
    assert result["metrics"]["skipped_samples"] == 3
    assert sorted(result["loader"]["skipped_files"]) == sorted(map(str, (corrupt, truncated, empty)))
    assert "skipped bad samples" in out.stdout and "3" in out.stdout


def test_result_folder_that_is_a_file(probe, tmp_path):
    (tmp_path / "r").write_text("I am a file")
    out = bench(*RUN, "--data", str(probe["root"]), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert str(tmp_path / "r") in out.stderr.strip().splitlines()[-1]
    assert (tmp_path / "r").read_text() == "I am a file"
