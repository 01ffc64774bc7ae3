"""The registry: every backend listed with its install state; unknown, uninstalled and misspelt
requests fail with one line that says what to do."""

from __future__ import annotations

import pytest

from loaders import LoaderError, backends, build_loader, registry
from loaders.pytorch import TorchBackend

from .conftest import bench


def test_lists_torch_and_synthetic_as_installed():
    state = {b.name: b.installed for b in backends()}
    assert state["torch"] and state["synthetic"]


def test_unknown_backend_names_the_known_ones(probe):
    with pytest.raises(LoaderError, match=r"unknown loader 'nope'; known: torch, synthetic"):
        build_loader("nope", probe["root"] / "train", batch_size=2)


def test_uninstalled_backend_names_the_extra(probe, monkeypatch):
    class Fancy(TorchBackend):
        name, summary, requires, extra = (
            "fancy",
            "needs a module that is not there",
            ("no_such_module_xyz",),
            "fancy",
        )

    fake = Fancy()
    monkeypatch.setitem(registry.BACKENDS, "fancy", fake)
    assert not fake.installed
    with pytest.raises(LoaderError) as exc:
        build_loader("fancy", probe["root"] / "train", batch_size=2)
    assert str(exc.value) == (
        "loader 'fancy' needs no_such_module_xyz, which is not installed: pip install 'loaderbench[fancy]'"
    )


def test_unknown_option_names_the_backends_options(probe):
    with pytest.raises(LoaderError, match=r"has no option\(s\) num_wrokers; its options: .*num_workers"):
        build_loader("torch", probe["root"] / "train", batch_size=2, num_wrokers=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(batch_size=2, rank=2, world_size=2), "rank 2 is not within world_size 2"),
        (dict(batch_size=2, rank=0), "pass both rank and world_size"),
        (dict(batch_size=2, dtype="fp8"), "dtype 'fp8' not supported"),
        (dict(batch_size=2, on_bad_sample="ignore"), "on_bad_sample must be one of stop, skip"),
        (dict(batch_size=2, num_workers=-1), "num_workers must be >= 0"),
        (dict(batch_size=2, prefetch_factor=4), "need num_workers >= 1"),
    ],
)
def test_impossible_options_are_refused_before_any_work(probe, kwargs, match):
    with pytest.raises(LoaderError, match=match):
        build_loader("torch", probe["root"] / "train", device="cpu", **kwargs)


def test_cuda_device_without_cuda_is_a_clear_error(probe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoaderError, match="CUDA is not available"):
        build_loader("torch", probe["root"] / "train", batch_size=2, device="cuda")


def test_bench_backends_lists_install_state(tmp_path):
    out = bench("backends", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "installed" in lines["torch"] and "installed" in lines["synthetic"]
