"""The CUDA paths of every backend and of the trainer (marked `gpu`: skipped without CUDA).

On a CPU machine these are skipped; run on a GPU machine with `pytest -m gpu`. Each compares the
CUDA path with the CPU path it must agree with, so a GPU-only bug (a pinned buffer reused before
its copy finished, a side stream not waited on, a wrong dtype or layout) fails here.
"""

from __future__ import annotations

import time

import pytest
import torch

from loaders import build_loader

from .conftest import available_backends, bench, decode_ids

pytestmark = pytest.mark.gpu

# The CUDA-specific data paths of each backend (the CPU paths are the conformance test's).
CUDA_VARIANTS = {
    "torch": [
        dict(num_workers=2, pin_memory=True),
        dict(num_workers=2, pin_memory=True, device_normalize=True),
        dict(num_workers=2, decode="gpu"),
    ],
    "dali": [dict(decode="gpu"), dict(decode="cpu"), dict(decode="gpu", reader="wds")],
    "ffcv": [dict(num_workers=2)],
    "wds": [dict(num_workers=2, pin_memory=True, device_normalize=True)],
    "spdl": [dict(num_threads=2, pin_memory=True), dict(num_threads=2, device_normalize=True)],
}
CASES = [
    pytest.param(name, opts, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items())}")
    for name in available_backends(reads_data=True)
    for opts in CUDA_VARIANTS.get(name, [{}])
]


def _cpu_opts(name: str, opts: dict) -> dict:
    drop = {"pin_memory", "decode"}
    return {k: v for k, v in opts.items() if k not in drop}


@pytest.mark.parametrize("name,opts", CASES)
def test_cuda_eval_batches_match_the_cpu_path(name, opts, small_data):
    def batches(device, **o):
        loader = build_loader(
            name, small_data / "val", batch_size=8, train=False, image_size=64, device=device, **o
        )
        out = [(x.float().cpu(), y.cpu(), x.is_cuda and y.is_cuda) for x, y in loader]
        loader.close()
        return out

    gpu, cpu = batches("cuda", **opts), batches("cpu", **_cpu_opts(name, opts))
    assert len(gpu) == len(cpu) > 1
    for (xg, yg, on_gpu), (xc, yc, _) in zip(gpu, cpu):
        assert on_gpu
        assert torch.equal(yg, yc)
        assert (xg - xc).abs().mean() < 0.05  # nvJPEG and libjpeg differ by IDCT rounding only


@pytest.mark.parametrize("name,opts", CASES)
def test_cuda_exact_once_and_kept_batches_stay_valid(name, opts, probe):
    """Every probe sample once per epoch on CUDA; batches kept by the caller are not overwritten by
    later ones (pinned buffers, side-stream copies and DALI/FFCV output buffers are reused)."""
    loader = build_loader(
        name, probe["root"] / "train", batch_size=4, train=True, image_size=16, device="cuda", **opts
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        kept = [(x, y) for x, y in loader]  # not cloned: must stay valid
        torch.cuda.synchronize()
        ids = [i for x, _ in kept for i in decode_ids(x)]
        assert sorted(ids) == sorted(probe["train"]), f"epoch {epoch}"
        assert [probe["train"][i] for i in ids] == [v for _, y in kept for v in y.tolist()]
    loader.close()


@pytest.mark.parametrize("name", available_backends())
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_low_precision_channels_last(name, dtype, small_data):
    loader = build_loader(
        name,
        small_data / "train",
        batch_size=8,
        image_size=64,
        device="cuda",
        dtype=dtype,
        channels_last=True,
    )
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
    assert images.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert images.shape == (8, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
    loader.close()


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_trainer_amp_channels_last_on_cuda(amp, small_data):
    """AMP (fp16 with GradScaler, bf16 without), channels_last, CUDA-event compute time, and the
    reported rate against an outside clock."""
    from bench.trainer import TrainConfig, train
    from bench.trainer.models import build_model

    loader = build_loader(
        "synthetic", small_data / "train", batch_size=32, image_size=64, device="cuda", channels_last=True
    )
    # 5 batches per synthetic epoch here: max_steps ends the run
    cfg = TrainConfig(epochs=10, max_steps=25, amp=amp, channels_last=True, warmup_steps=5)
    t0 = time.perf_counter()
    result = train(build_model("resnet18", 4), loader, None, cfg, torch.device("cuda"), log=lambda *a: None)
    outside = time.perf_counter() - t0
    assert result.steps == 25 and result.measured_images == 20 * 32
    assert all(c > 0 for c in result.compute) and len(result.compute) == 20
    assert (
        result.images_per_second >= result.measured_images / outside
    )  # warm-up excluded, never faster than real
    assert result.epochs[0].train_loss == result.epochs[0].train_loss  # not NaN: the scaler did its job


@pytest.mark.parametrize("name", available_backends(reads_data=True))
def test_bench_run_on_cuda(name, small_data, tmp_path):
    p = bench(
        "run",
        "--loader",
        name,
        "--data",
        str(small_data),
        "--model",
        "resnet18",
        "--amp",
        "bf16",
        "--channels-last",
        "--steps",
        "12",
        "--batch-size",
        "16",
        "--image-size",
        "64",
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    (path,) = tmp_path.glob("*.json")
    r = json.loads(path.read_text())
    assert r["config"]["device"].startswith("cuda") and r["environment"]["gpus"]
    assert r["metrics"]["images_per_second"] > 0


def test_torch_gpu_decode_train_batches_match_the_cpu_path(small_data):
    """nvJPEG in the main process: the same crops and flips (drawn in the workers) as the CPU path."""

    def batches(device, **o):
        loader = build_loader(
            "torch", small_data / "train", batch_size=8, image_size=64, device=device, num_workers=2, **o
        )
        loader.set_epoch(1)
        out = [(x.float().cpu(), y.cpu()) for x, y in loader]
        loader.close()
        return out

    gpu, cpu = batches("cuda", decode="gpu"), batches("cpu")
    assert len(gpu) == len(cpu) > 1
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg, yc)
        assert (xg - xc).abs().mean(dim=(1, 2, 3)).max() < 0.05


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_torch_gpu_decode_names_a_truncated_jpeg(policy, probe, tmp_path):
    """A file whose header parses but whose data is cut: found by nvJPEG in the main process, named."""
    import shutil

    from loaders import BadSampleError

    data = tmp_path / "d"
    shutil.copytree(probe["root"] / "train", data)
    victim = sorted(data.rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:-200])
    loader = build_loader(
        "torch",
        data,
        batch_size=4,
        image_size=16,
        device="cuda",
        num_workers=2,
        decode="gpu",
        on_bad_sample=policy,
    )
    if policy == "stop":
        with pytest.raises(BadSampleError, match=str(victim)):
            list(loader)
    else:
        ids = [i for x, _ in loader for i in decode_ids(x)]
        assert loader.skipped == [str(victim)] and len(ids) == len(probe["train"]) - 1
    loader.close()
