"""The run spec: built once, carried to a child process exactly (to_argv / from_argv are inverses
for every backend's options), recorded as it is."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from bench.errors import UsageError
from bench.harness.spec import RunSpec
from loaders import LoaderError, backends


def _other_value(hint: str, default):
    """A value of the declared type that differs from the default."""
    if "bool" in hint:
        return not default if default is not None else True
    if "int" in hint:
        return 3 if default != 3 else 4
    if "float" in hint:
        return 0.375 if default != 0.375 else 0.625
    return "x=y z"  # strings travel as they are, '=' included


@pytest.mark.parametrize("name", [b.name for b in backends()])
def test_argv_round_trip_is_exact_for_every_backend_option(name):
    backend = next(b for b in backends() if b.name == name)
    hints = typing.get_type_hints(backend.Options)
    defaults = backend.Options()
    for f in dataclasses.fields(backend.Options):
        for value in {_other_value(str(hints[f.name]), getattr(defaults, f.name)), getattr(defaults, f.name)}:
            if value is None and "None" not in str(hints[f.name]):
                continue
            spec = RunSpec(
                loader=name,
                options=dataclasses.replace(defaults, **{f.name: value}),
                steps=12,
                amp="bf16",
                channels_last=True,
                eval=False,
                eval_inference_mode=False,
                lr=0.125,
                data="/d a/t",
                label="a b",
            )
            assert RunSpec.from_argv(spec.to_argv()) == spec, (f.name, value, spec.to_argv())
    # None where a field allows it, and the defaults: nothing but the loader on the command line
    assert RunSpec(loader=name).to_argv() == ([] if name == "torch" else ["--loader", name])


def test_knob_shortcuts_use_each_backends_own_option():
    assert RunSpec.from_argv(["--loader", "dali", "--workers", "3"]).options.num_threads == 3
    assert RunSpec.from_argv(["--workers", "3", "-o", "num_workers=1"]).options.num_workers == 1  # -o wins
    with pytest.raises(UsageError, match="--pin-memory: loader 'synthetic' has no such knob"):
        RunSpec.from_argv(["--loader", "synthetic", "--pin-memory"])
    with pytest.raises(LoaderError, match="-o num_workers=two: expected int"):
        RunSpec.from_argv(["-o", "num_workers=two"])
    with pytest.raises(LoaderError, match="has no option"):
        RunSpec.from_argv(["-o", "nope=1"])


def test_variants_are_derived_with_replace_and_recorded_as_they_are():
    base = RunSpec(steps=10)
    swapped = base.with_loader("wds", workers=2, pin_memory=True, persistent=True)
    assert swapped.options.num_workers == 2 and swapped.options.pin_memory
    assert not hasattr(swapped.options, "persistent_workers")  # a knob wds does not have is left out
    rec = swapped.record()
    assert rec["loader_options"]["num_workers"] == 2 and RunSpec.from_argv(rec["argv"]) == swapped
    with pytest.raises(TypeError):
        dataclasses.replace(base, options=swapped.options)  # another backend's options


def test_convert_passes_storage_flags_to_the_target_backends_own_options(probe, tmp_path):
    from .conftest import bench

    p = bench(
        "data",
        "convert",
        "--to",
        "wds",
        "--data",
        str(probe["root"]),
        "--out",
        str(tmp_path / "w"),
        "--write-mode",
        "raw",
        cwd=tmp_path,
    )
    assert p.returncode == 2 and "--to wds has no storage setting --write-mode" in p.stderr, p.stderr
    p = bench(
        "data",
        "convert",
        "--to",
        "wds",
        "--data",
        str(probe["root"]),
        "--out",
        str(tmp_path / "w"),
        "--shard-samples",
        "5",
        "--seed",
        "3",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads((tmp_path / "w" / "train" / "manifest.json").read_text())
    assert manifest["sharding"]["shard_samples"] == 5 and manifest["sharding"]["seed"] == 3
    # 21 samples in ceil(21 / 5) shards, balanced
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 4, 5]
