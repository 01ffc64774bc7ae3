"""The verdict under every `bench run`: which limit the run's own figures show, and one next
command that carries the run's settings and that bench's parser accepts."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from bench import cli
from bench.harness.doctor import run_verdict
from bench.harness.result import Metrics
from bench.harness.spec import RunSpec


def metrics(ips=100.0, wait=0.5, images=640):
    return Metrics(images_per_second=ips, measured_images=images, data_wait_share=wait)


CASES = [  # spec, metrics, cuda, cores -> kind, next command's start
    (RunSpec(), metrics(wait=0.5), False, 2, "input-bound", "bench tune --loader torch"),
    (RunSpec().with_loader("torch", workers=2), metrics(wait=0.5), False, 2, "input-bound", "bench doctor"),
    (RunSpec().with_loader("torch", workers=8), metrics(wait=0.5), True, 8, "input-bound", "bench plan"),
    (RunSpec().with_loader("torch", workers=2), metrics(wait=0.04), False, 2, "unclear", "bench doctor"),
    (RunSpec(), metrics(wait=0.04), False, 2, "compute-bound", "bench sweep"),
    (RunSpec().with_loader("torch", workers=8), metrics(wait=0.04), True, 8, "compute-bound", "bench sweep"),
    (RunSpec(loader_only=True), metrics(wait=1.0), False, 2, "none", "bench doctor --loader torch"),
    (
        RunSpec().with_loader("synthetic"),
        metrics(wait=0.0),
        False,
        2,
        "ceiling",
        "bench doctor --loader torch",
    ),
]


@pytest.mark.parametrize("spec,m,cuda,cores,kind,start", CASES)
def test_the_verdict_names_the_limit_and_a_next_command_bench_accepts(spec, m, cuda, cores, kind, start):
    spec = dataclasses.replace(spec, model="resnet18", batch_size=32, steps=40, data="/data/x")
    v = run_verdict(spec, m, cuda, cores)
    assert v["kind"] == kind and v["next"].startswith(start)
    args = cli.parser().parse_args(shlex.split(v["next"])[1:])  # SystemExit if bench refused it
    assert (args.model, args.batch_size, args.data) == ("resnet18", 32, "/data/x")
    if kind == "input-bound":  # by how much: 50 % waiting -> about twice the rate without the wait
        assert v["ceiling_estimate"] == pytest.approx(200.0) and "2.0x" in v["text"]


def test_no_verdict_without_measured_steps_and_the_default_data_left_implicit():
    v = run_verdict(RunSpec(data="/cache/synth"), metrics(images=0), False, 2, default_data="/cache/synth")
    assert v["kind"] == "none" and v["next"] is None and "--steps" in v["text"]
    v = run_verdict(RunSpec(data="/cache/synth"), metrics(), False, 2, default_data="/cache/synth")
    assert v["next"] == "bench tune --loader torch"
