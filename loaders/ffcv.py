"""`ffcv` backend: an ImageFolder split converted once to a ``.beton``, read by FFCV's Loader.

FFCV decodes (libjpeg-turbo) and crops in numba-compiled code on its own threads; images leave it
as uint8 and are normalised by torch on the device (FFCV's NormalizeImage hangs on the CPU after
ToTorchImage and needs cupy on the GPU). Normalising into a new tensor also means the batches a
caller keeps are not overwritten when FFCV reuses its output buffers.

Sharding: each epoch FFCV traverses ``epoch_indices()``, the permutation and strided split every
backend shares (DistributedSampler's scheme: padding of at most world_size - 1 repeats in
training, an exact split in evaluation), so it needs no process group and its place in an epoch
is a state any number of ranks continues. ``data`` is a ``.beton`` or an ImageFolder split,
converted on first use into the cache (``convert_beton``).

Known limits: FFCV does not seed its augmentations (crops and flips differ between runs with
the same seed; the order does not); its first epoch in a process spends seconds compiling,
reported as ``first_batch_seconds``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import objstore
from .backend import Backend
from .contract import BaseLoader, LoaderConfig, LoaderError, available_cores, rank_share, scan_imagefolder
from .feed import normalize_uint8
from .images import decode_problem, decode_rgb
from .stored import cache_dir, cached, file_entry, require_manifest, temp_output, verify_files

ORDERS = ("random", "quasi_random")
WRITE_MODES = ("jpg", "raw", "proportion", "smart")
MANIFEST_SUFFIX = ".json"  # train.beton -> train.beton.json
KIND = "loaderbench ffcv beton"


@dataclass(frozen=True)
class Storage:
    """How a split is stored in the .beton (recorded beside it and in every result)."""

    write_mode: str = "jpg"  # jpg: re-encoded at jpeg_quality; raw: decoded pixels; proportion: a mix
    max_resolution: int | None = None  # longest side cap; None keeps the originals' size
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # write_mode='proportion' only


@dataclass(frozen=True)
class Options:
    num_workers: int | None = None  # FFCV threads; default and cap: the cores
    order: str = "random"  # random | quasi_random (single rank only: FFCV forbids it distributed)
    os_cache: bool = True  # True: memory-map through the page cache; False: FFCV's own process cache
    batches_ahead: int = 3
    write_mode: str = "jpg"  # storage choices used when data is an ImageFolder converted on first use
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5


def _import_ffcv():
    """Import FFCV without letting it take over torch's thread count."""
    threads = torch.get_num_threads()
    if available_cores() < (os.cpu_count() or 1) and "numba" not in sys.modules:
        # Under a narrowed affinity (--cpus, taskset) a process that wrote a .beton hangs at exit in
        # numba's TBB layer (unload_tbb waits forever; measured, 3 of 3); the OpenMP layer does not.
        os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
    import numba
    from ffcv.pipeline.compiler import Compiler

    torch.set_num_threads(threads)  # `import ffcv` set it to 1
    if not getattr(Compiler, "_loaderbench_patched", False):
        # FFCV sets torch's intra-op threads to its worker count on every epoch; keep numba's part.
        def set_num_threads(cls, n):
            cls.num_threads = n if n >= 1 else available_cores()
            numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

        Compiler.set_num_threads = classmethod(set_num_threads)
        Compiler._loaderbench_patched = True
    _patch_epoch_iterator()


class _Closed(Exception):
    """Raised in FFCV's pipeline thread when its iterator was closed: the thread ends."""


def _stop(it) -> None:
    """Close an epoch iterator and wait for its pipeline thread to end. The thread is a daemon: a
    process that exits while it is inside a numba kernel (an epoch cut short by --steps, a rank with
    nothing left to do) aborts with SIGABRT after its work is done."""
    import queue

    it.terminate_event.set()
    deadline = time.monotonic() + 30
    while it.is_alive() and time.monotonic() < deadline:
        try:  # frees a put() that blocks without a timeout (FFCV's end-of-epoch marker)
            it.output_queue.get_nowait()
        except queue.Empty:
            pass
        it.join(timeout=0.05)
    it.close()


class _PipelineFailed:
    """Put in FFCV's output queue by a pipeline thread that raised, so the consumer raises too."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _patch_epoch_iterator() -> None:
    """FFCV's pipeline thread dies silently on an exception (a bad record, a numba or CUDA error)
    and its consumer then waits on the output queue forever. Hand the exception to the consumer."""
    from ffcv.loader import epoch_iterator as ei

    if getattr(ei.EpochIterator, "_loaderbench_patched", False):
        return
    run, run_pipeline = ei.EpochIterator.run, ei.EpochIterator.run_pipeline

    def checked_pipeline(self, *args):  # FFCV checks for close() only while its queue is full
        if self.terminate_event.is_set():
            raise _Closed
        return run_pipeline(self, *args)

    def guarded_run(self):
        try:
            run(self)
        except _Closed:
            return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(_PipelineFailed(exc), timeout=0.5)
                    return
                except ei.Full:
                    continue

    def next_batch(self):  # FFCV's __next__, plus the failure check
        result = self.output_queue.get()
        if isinstance(result, _PipelineFailed):
            self.close()
            raise result.exc
        if result is None:
            self.close()
            raise StopIteration()
        slot, result = result
        if ei.IS_CUDA:
            self.current_stream.wait_stream(self.cuda_streams[slot])  # the copy is done
        return result

    ei.EpochIterator.run = guarded_run
    ei.EpochIterator.run_pipeline = checked_pipeline
    ei.EpochIterator.__next__ = next_batch
    ei.EpochIterator._loaderbench_patched = True


_WRITER_OUT_OF_SPACE = 28  # a writer process's exit status for ENOSPC (the errno's value)
_writer_processes: list = []  # the running conversion's writer processes and progress bars
_writer_bars: list = []


def _patch_writer() -> None:
    """FFCV's DatasetWriter waits for its worker processes' sample count and never checks whether
    they are alive: a worker that fails (a full disk, an unreadable file) hangs the conversion
    forever. Workers now exit with a status that says why, and the wait checks them."""
    import errno
    import multiprocessing
    import time as _time

    from ffcv import writer as w

    if getattr(w, "_loaderbench_patched", False):
        return
    job = w.worker_job_indexed_dataset
    started, bars = _writer_processes, _writer_bars

    def guarded_job(*args):
        try:
            job(*args)
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"ffcv writer process: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            os._exit(_WRITER_OUT_OF_SPACE if full else 1)

    class TrackedBar(w.tqdm):  # closed before the error is raised, so it prints before the message
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    class TrackedProcess(multiprocessing.Process):
        def start(self):
            started.append(self)
            super().start()

    def checking_sleep(seconds):
        _time.sleep(seconds)
        failed = [p for p in started if p.exitcode not in (None, 0)]
        if failed:
            for p in started:
                if p.exitcode is None:
                    p.kill()
            codes = {p.exitcode for p in failed}
            started.clear()
            for bar in bars:
                bar.close()
            bars.clear()
            if _WRITER_OUT_OF_SPACE in codes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise LoaderError(
                f"an FFCV writer process failed (exit status {sorted(codes)}; its error is above)"
            )

    w.worker_job_indexed_dataset = guarded_job
    w.Process = TrackedProcess
    w.tqdm = TrackedBar
    w.sleep = checking_sleep
    w._loaderbench_patched = True


def check_storage(s: Storage) -> None:
    if s.write_mode not in WRITE_MODES:
        raise LoaderError(f"write_mode must be one of {', '.join(WRITE_MODES)}, got {s.write_mode!r}")
    if s.max_resolution is not None and s.max_resolution < 8:
        raise LoaderError(f"max_resolution must be >= 8, got {s.max_resolution}")
    if not 1 <= s.jpeg_quality <= 100:
        raise LoaderError(f"jpeg_quality must be within 1..100, got {s.jpeg_quality}")
    if not 0.0 <= s.compress_probability <= 1.0:
        raise LoaderError(f"compress_probability must be within 0..1, got {s.compress_probability}")


class _Images:
    """(PIL image, label) per index, for FFCV's writer; a bad file stops the conversion, named."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        path = str(self.paths[i])
        try:
            image = decode_rgb(path)
        except Exception as exc:
            raise LoaderError(f"cannot convert {path}: {type(exc).__name__}: {exc}") from None
        return image, int(self.labels[i])


def _validate_images(paths: np.ndarray, workers: int) -> None:
    """Decode every image once before writing: FFCV's writer processes would hide which one failed."""
    from concurrent.futures import ThreadPoolExecutor

    names = list(map(str, paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        for path, problem in zip(names, pool.map(decode_problem, names, chunksize=64)):
            if problem:
                raise LoaderError(
                    f"cannot convert {path}: {problem} (ffcv decodes inside its compiled pipeline and "
                    "cannot skip a bad sample, so conversion checks every image: remove or replace "
                    "the file, then convert again)"
                )


def convert_beton(split: Path, out: Path, storage=Storage(), workers=None, progress=True) -> dict:
    """Write ImageFolder ``split`` to the .beton ``out`` and its manifest ``out.json``.

    Written to a hidden temporary and renamed, manifest last: a .beton without its manifest (or
    whose size disagrees with it) is incomplete and refused by the loader.
    """
    _import_ffcv()
    _patch_writer()
    _writer_processes.clear()
    _writer_bars.clear()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    check_storage(storage)
    split, out = Path(split), Path(out)
    index = scan_imagefolder(split)
    workers = workers or os.cpu_count() or 1
    _validate_images(index.paths, workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    m_path = Path(str(out) + MANIFEST_SUFFIX)
    start = time.perf_counter()
    with temp_output(out) as tmp:
        writer = None
        try:
            field = RGBImageField(
                write_mode=storage.write_mode,
                max_resolution=storage.max_resolution,
                jpeg_quality=storage.jpeg_quality,
                compress_probability=storage.compress_probability,
            )
            writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()}, num_workers=workers)
            writer.from_indexed_dataset(_Images(index.paths, index.labels), chunksize=32)
        except BaseException:
            sm = getattr(writer, "metadata_sm", None)
            if sm is not None:  # FFCV's shared memory, freed only on success
                sm.close()
                try:
                    sm.unlink()
                except FileNotFoundError:
                    pass
            raise
        entry = file_entry(tmp)
        manifest = {
            "kind": KIND,
            "source": str(split.resolve()),
            "samples": len(index),
            "classes": list(index.classes),
            "storage": asdict(storage),
            "bytes": entry["bytes"],
            "sha1": entry["sha1"],
            "seconds": round(time.perf_counter() - start, 2),
        }
        with temp_output(m_path) as m_tmp:
            m_tmp.write_text(json.dumps(manifest, indent=1))
            # The manifest last: killed between the two, the .beton has none and loaders refuse it.
            os.replace(tmp, out)
            os.replace(m_tmp, m_path)
    if progress:
        print(
            f"ffcv: wrote {out} ({manifest['bytes'] / 1e6:.1f} MB, {len(index)} samples) in "
            f"{manifest['seconds']:.1f} s"
        )
    return manifest


def read_manifest(beton: Path, verify: bool = True) -> dict:
    """The manifest of a complete, undamaged .beton, or a LoaderError naming what is wrong. FFCV
    decodes a damaged JPEG record into garbage without a word, so the file's checksum, recorded at
    conversion, is checked (``verify_files``)."""
    m_path = Path(str(beton) + MANIFEST_SUFFIX)
    require_manifest(beton, m_path, "ffcv file", "ffcv")
    try:
        manifest = json.loads(m_path.read_text())
        entry = {"file": beton.name, "bytes": manifest["bytes"], "sha1": manifest.get("sha1")}
    except (ValueError, KeyError, TypeError):
        raise LoaderError(f"{m_path} is damaged; convert again") from None
    verify_files(beton.parent, [{k: v for k, v in entry.items() if v is not None}], "ffcv file", verify)
    return manifest


def cached_beton(split: Path, storage: Storage, progress: bool = True) -> Path:
    """The .beton of an ImageFolder split under these storage choices, converted on first use."""
    return cached(
        cache_dir("ffcv", split, asdict(storage)) / f"{split.name}.beton",
        read_manifest,
        lambda out: convert_beton(split, out, storage, progress=progress),
    )


def storage_of(opts: Options) -> Storage:
    return Storage(opts.write_mode, opts.max_resolution, opts.jpeg_quality, opts.compress_probability)


class FfcvBackend(Backend):
    name = "ffcv"
    summary = "FFCV: .beton files (converted once from the ImageFolder) + FFCV Loader"
    Options = Options
    requires = ("ffcv", "numba")
    knobs = {"workers": "num_workers", "prefetch": "batches_ahead"}
    min_workers = 1
    prefetch_values = (1, 2, 3, 5)
    stored_format = "FFCV .beton files"
    reads_s3 = True

    def build(self, cfg: LoaderConfig, opts: Options) -> FfcvLoader:
        return _build(cfg, opts)

    def stored(self, split: Path, opts: Options) -> Path:
        return cached_beton(Path(split), storage_of(opts)) if Path(split).is_dir() else Path(split)

    def locate(self, root: Path, split: str, opts) -> Path | None:
        beton = root / f"{split}.beton"
        return beton if beton.exists() and not (root / split).is_dir() else None

    def holds(self, root: Path) -> bool:
        return (root / "train.beton").exists() and not (root / "train").is_dir()

    def storage_stats(self, path: Path) -> dict | None:
        if path.suffix != ".beton":
            return None  # its manifest is recorded as the loader's storage
        return {
            "source": str(path),
            "mean_width": None,
            "mean_height": None,
            "mean_bytes": None,
            "jpeg_quality": None,
        }

    def convert(self, split: Path, out_root: Path, opts, workers: int | None = None) -> tuple[Path, str]:
        out = out_root / f"{split.name}.beton"
        m = convert_beton(split, out, storage_of(opts), workers=workers, progress=False)
        return (
            out,
            f"ffcv: wrote {out} ({m['bytes'] / 1e6:.1f} MB, {m['samples']} samples) in {m['seconds']:.1f} s",
        )


def _build(cfg: LoaderConfig, opts: Options) -> FfcvLoader:
    if opts.order not in ORDERS:
        raise LoaderError(f"ffcv order must be one of {', '.join(ORDERS)}, got {opts.order!r}")
    if opts.num_workers is not None and opts.num_workers < 1:
        raise LoaderError(f"ffcv num_workers must be >= 1, got {opts.num_workers}")
    if opts.batches_ahead < 1:
        raise LoaderError(f"ffcv batches_ahead must be >= 1, got {opts.batches_ahead}")
    storage = storage_of(opts)
    check_storage(storage)
    if cfg.train and cfg.world_size > 1 and opts.order == "quasi_random":
        raise LoaderError(
            "ffcv order 'quasi_random' cannot be used with several ranks (FFCV forbids it "
            "with distributed=True); use order='random'"
        )
    if cfg.data is None:
        raise LoaderError("the ffcv backend needs data= (a .beton, or an ImageFolder split to convert)")
    staged = None
    if objstore.is_url(cfg.data):  # FFCV memory-maps its file: copy it from the bucket first
        staged = objstore.Staged()
        try:
            data = staged.fetch(cfg.data)
            staged.fetch(cfg.data + MANIFEST_SUFFIX)
        except BaseException:
            staged.remove()
            raise
    else:
        data = Path(cfg.data)
    converted = data.is_dir()
    if converted:
        data = cached_beton(data, storage, progress=cfg.rank == 0)  # verified there
    try:
        manifest = read_manifest(data, verify=not converted)
        loader = FfcvLoader(cfg, opts, data, manifest)
    except BaseException:
        if staged is not None:
            staged.remove()
        raise
    loader.staged = staged
    return loader


class FfcvLoader(BaseLoader):
    """FFCV's Loader reading the contract's order: each epoch's traversal is ``epoch_indices()``
    (the permutation and strided split every backend shares, or FFCV's own quasi-random order on
    one rank), so FFCV needs no process group and a state continues on any ranks and workers."""

    name = "ffcv"
    seeded_augmentation = False
    index_order = True

    def __init__(self, cfg: LoaderConfig, opts: Options, beton: Path, manifest: dict):
        super().__init__(
            cfg,
            *rank_share(manifest["samples"], cfg, beton),
            tuple(manifest["classes"]),
            split_size=manifest["samples"],
        )
        self.options, self.beton, self.manifest = opts, beton, manifest
        self.staged = None  # an objstore.Staged copy of a bucket's .beton, removed at close()
        cores = available_cores()
        self.workers = min(opts.num_workers or cores, cores)
        self.note = (
            f"num_workers {opts.num_workers} capped at the {cores} cores this run may use (FFCV refuses more)"
            if opts.num_workers and opts.num_workers > cores
            else None
        )
        self.first_batch_seconds: float | None = None  # includes numba's compilation (first epoch)
        self._loader = self._make()
        self._loader.next_traversal_order = self._traversal  # FFCV asks for it once per epoch

    def _make(self):
        _import_ffcv()
        from ffcv.fields.decoders import (
            CenterCropRGBImageDecoder,
            IntDecoder,
            RandomResizedCropRGBImageDecoder,
        )
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        cfg = self.config
        size = cfg.image_size
        if cfg.train:
            image = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
        else:
            image = [CenterCropRGBImageDecoder((size, size), ratio=0.875)]
        image.append(ToTensor())
        # No Squeeze: it turns a one-sample batch's [1, 1] labels into a 0-d tensor, which FFCV's
        # ToDevice cannot slice (found on a GPU); __iter__ flattens them instead.
        label = [IntDecoder(), ToTensor()]
        if cfg.device.type == "cuda":
            image.append(ToDevice(cfg.device, non_blocking=True))
            label.append(ToDevice(cfg.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True))  # a view: NHWC storage seen as NCHW
        order = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}[self.options.order]
        kwargs = dict(
            batch_size=cfg.batch_size,
            num_workers=self.workers,
            os_cache=self.options.os_cache,
            drop_last=cfg.drop_last,
            batches_ahead=self.options.batches_ahead,
            seed=cfg.seed,
            pipelines={"image": image, "label": label},
        )
        # The order is ours (``_traversal``); FFCV's own serves only quasi_random's page-aware order.
        kwargs.update(order=order if cfg.train else OrderOption.SEQUENTIAL)
        threads = torch.get_num_threads()
        try:
            return Loader(str(self.beton), **kwargs)
        except Exception as exc:
            raise LoaderError(f"ffcv cannot read {self.beton}: {type(exc).__name__}: {exc}") from None
        finally:
            torch.set_num_threads(threads)

    def epoch_order(self) -> np.ndarray:
        if self.config.train and self.options.order == "quasi_random":  # one rank only (see _build)
            return np.asarray(self._loader.traversal_order.sample_order(self.epoch))
        return super().epoch_order()

    def _traversal(self) -> np.ndarray:
        order = self.epoch_indices()
        if self.config.drop_last:
            order = order[: len(order) - len(order) % self.config.batch_size]
        return order.astype(self._loader.indices.dtype)

    def describe(self) -> dict:
        d = super().describe()
        cuda = self.config.device.type == "cuda"
        d.update(
            decode="cpu (FFCV, libjpeg-turbo, numba threads)",
            normalize="gpu (torch)" if cuda else "cpu (torch)",
            num_workers=self.workers,
            note=self.note,
            beton=str(self.beton),
            storage=self.manifest["storage"],
            first_batch_seconds=self.first_batch_seconds,
        )
        if self.staged is not None:
            d["staged"] = self.staged.describe()
        return d

    def _epoch_batches(self):
        cfg = self.config
        self._loader.next_epoch = self.epoch  # FFCV counts epochs itself; set_epoch decides
        threads = torch.get_num_threads()
        start = time.perf_counter()
        # FFCV allocates its output buffers here and its pipeline thread writes them in place; under
        # the caller's torch.inference_mode (evaluation) they would be inference tensors, which a
        # thread outside that mode may not update (found on a GPU, where ToDevice allocates them).
        with torch.inference_mode(False):
            it = iter(self._loader)
        torch.set_num_threads(threads)
        try:
            while True:
                try:
                    images, labels = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # raised in FFCV's pipeline thread (see _patch_epoch_iterator)
                    raise LoaderError(
                        f"ffcv failed reading {self.beton}: {type(exc).__name__}: {exc}"
                    ) from exc
                if self.first_batch_seconds is None:
                    self.first_batch_seconds = time.perf_counter() - start
                labels = labels.view(-1)
                # New tensors (FFCV reuses its buffers): normalised images and int64 labels.
                labels = labels.to(torch.int64, copy=True)
                yield normalize_uint8(images, cfg), labels
        finally:
            _stop(it)

    def close(self) -> None:
        if self.staged is not None:
            self.staged.remove()
