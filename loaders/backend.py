"""What a backend is: one class per backend module that knows its options, how to build a loader,
how to prepare, recognise and describe its stored format, and which of its options are the
parallelism, pinned-memory and prefetch knobs the harness turns. The harness asks; it never
names a backend."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path
from typing import ClassVar

from .contract import BaseLoader, LoaderConfig, LoaderError

# The techniques a backend may map to one of its options (the ladder and `bench tune` turn them).
TECHNIQUES = ("workers", "pin_memory", "persistent", "prefetch", "device_normalize")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


class Backend:
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]  # a frozen dataclass: the backend's own typed options
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules the backend needs
    extra: ClassVar[str | None] = None  # the pip extra that installs them; None: the backend's name
    knobs: ClassVar[dict[str, str]] = {}  # technique (TECHNIQUES) -> this backend's option for it
    min_workers: ClassVar[int] = 0  # the smallest value its parallelism option accepts
    prefetch_values: ClassVar[tuple[int, ...]] = ()  # what `bench tune` tries for its prefetch option
    stored_format: ClassVar[str | None] = None  # what `convert` writes, e.g. "FFCV .beton files"
    reads_s3: ClassVar[bool] = False  # builds on s3:// URLs of what it reads (directly, or staged)
    is_ceiling: ClassVar[bool] = False  # reads no data: the rate with no input cost (synthetic)

    # -- what every backend has -------------------------------------------------------------------
    @property
    def missing(self) -> list[str]:
        return [m for m in self.requires if not _importable(m)]

    @property
    def installed(self) -> bool:
        return not self.missing

    def install_hint(self) -> str:
        return f"pip install 'loaderbench[{self.extra or self.name}]'"

    def options(self, **values):
        """The backend's Options from keyword values, naming any it does not know. ``num_workers``
        is understood by every backend (DataLoader's name): the backend's own parallelism option
        (``num_threads`` for dali and spdl), 0 meaning the least it can do (the calling process for
        DataLoader-based backends, one thread for the others)."""
        values = self._common_names(values)
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoaderError(
                f"loader {self.name!r} has no option(s) {', '.join(unknown)}; its options: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        return self.Options(**values)

    def _common_names(self, values: dict) -> dict:
        if "num_workers" not in values:
            return values
        values, knob = dict(values), self.knobs.get("workers")
        if knob is None:  # no parallelism to set (synthetic reads nothing)
            values.pop("num_workers")
            return values
        n = values.pop("num_workers")
        if isinstance(n, str):  # from a command line: -o num_workers=2
            try:
                n = None if n.lower() == "none" else int(n)
            except ValueError:
                raise LoaderError(
                    f"loader {self.name!r}: num_workers must be an integer, got {n!r}"
                ) from None
        if knob != "num_workers" and knob in values:
            raise LoaderError(f"loader {self.name!r}: pass num_workers or {knob}, not both")
        values[knob] = n if n is None or n < 0 else max(self.min_workers, n)
        return values

    def option_types(self) -> dict[str, str]:
        """Each option's declared type, as text ("int | None"), for parsing it from a command line."""
        hints = typing.get_type_hints(self.Options)
        return {f.name: str(hints[f.name]) for f in dataclasses.fields(self.Options)}

    def build(self, cfg: LoaderConfig, opts) -> BaseLoader:
        raise NotImplementedError

    # -- the techniques' knobs --------------------------------------------------------------------
    def with_techniques(self, opts, **values):
        """``opts`` with each technique given (workers=4, pin_memory=True, ...) set through the option
        that this backend maps it to; techniques it has no option for are left out. Workers below
        ``min_workers`` are raised to it; prefetch and persistence need workers."""
        unknown = set(values) - set(TECHNIQUES)
        if unknown:
            raise ValueError(f"unknown technique(s) {sorted(unknown)}")
        if "workers" in values:
            values["workers"] = max(self.min_workers, values["workers"])
        workers = values.get("workers", getattr(opts, self.knobs.get("workers", ""), 1))
        if not workers:
            values.pop("persistent", None)
            values.pop("prefetch", None)
        change = {self.knobs[t]: v for t, v in values.items() if t in self.knobs and v is not None}
        return dataclasses.replace(opts, **change)

    def gpu_work_between_steps(self, options: dict) -> bool:
        """True where the loader's GPU work runs in the training process between steps, so that it
        adds to a step's time instead of overlapping it (the planner's model, docs/plan.md)."""
        return False

    def workers_of(self, options: dict):
        """The parallelism (workers or threads) recorded in a result's options, or None."""
        knob = self.knobs.get("workers")
        return options.get(knob) if knob else None

    # -- stored formats ---------------------------------------------------------------------------
    def stored(self, split: Path, opts) -> Path:
        """The local file or folder this backend reads for the ImageFolder ``split`` (converted first,
        once, where it must be): what a cold run evicts and an object-store run uploads."""
        return Path(split)

    def prepare(self, split: Path, opts) -> None:
        """Convert an ImageFolder split once, before several ranks start (they then find it cached)."""
        self.stored(split, opts)

    def locate(self, root: Path, split: str, opts) -> Path | None:
        """``split`` of ``root`` in this backend's own stored format, when ``root`` holds it."""
        return None

    def holds(self, root: Path) -> bool:
        """Whether ``root`` holds a stored format this backend reads (with some option)."""
        return False

    def storage_stats(self, path: Path) -> dict | None:
        """Storage statistics of a split in this backend's own format, or None if ``path`` is not one."""
        return None

    def convert(self, split: Path, out_root: Path, opts, workers: int | None = None) -> tuple[Path, str]:
        """Write ``split`` in this backend's stored format under ``out_root``: (path, a summary line)."""
        raise LoaderError(f"loader {self.name!r} has no stored format to convert to")
