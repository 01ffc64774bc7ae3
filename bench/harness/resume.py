"""`bench run --resume DIR`: the settings a checkpointed run recorded in DIR/run.json, with the
flags given now on top (another --cpu-ranks to resume on other ranks, more --epochs...)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from ..errors import UsageError
from ..trainer.checkpoint import latest
from .spec import RunSpec

RUN_FILE = "run.json"
SCHEMA = "loaderbench.run/1"


def record_run(spec: RunSpec) -> None:
    """Write DIR/run.json (atomically) for a run that checkpoints into DIR: what --resume re-reads."""
    folder = Path(spec.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(spec, checkpoint=None, resume=False).to_argv()
    tmp = folder / f".{RUN_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"schema": SCHEMA, "argv": settings}, indent=1))
    os.replace(tmp, folder / RUN_FILE)


def resumed_run(
    args, argv: list[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, list[str]]:
    """The arguments of the run DIR records, then the user's own (which win), with --resumed."""
    folder = Path(args.resume_dir)
    try:
        doc = json.loads((folder / RUN_FILE).read_text())
        recorded = doc["argv"]
        if doc.get("schema") != SCHEMA or not isinstance(recorded, list):
            raise ValueError(f"schema {doc.get('schema')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--resume {folder}: no readable {RUN_FILE} there ({exc}); it is written by "
            "`bench run --checkpoint DIR`"
        ) from None
    if latest(folder) is None:
        raise UsageError(f"--resume {folder}: the run has written no checkpoint yet (nothing to resume)")
    own, skip = [], False
    for a in argv[1:]:  # argv[0] is "run"
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            own.append(a)
    full = ["run", *recorded, *own, "--checkpoint", str(folder), "--resumed"]
    return parser.parse_args(full), full
