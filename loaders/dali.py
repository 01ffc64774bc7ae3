"""`dali` backend: an NVIDIA DALI pipeline over the ImageFolder.

On CUDA, JPEGs are decoded with nvJPEG (``device="mixed"``, the hardware decoder taking
``hw_decoder_load`` of the work) and cropped, flipped and normalised on the GPU. ``decode="cpu"``
decodes and crops on the CPU and normalises on the GPU (NVIDIA's "dali-cpu" variant, faster for
heavy models). Without CUDA the same pipeline runs with CPU operators only and ``device_id=None``.

Sharding: each epoch this rank's file list is ``shard_indices`` (the permutation and padding every
backend shares) handed to a one-shard ``fn.readers.file`` with ``pad_last_batch=True``. The reader's
own ``shard_id``/``num_shards`` would split one fixed class-sorted list into contiguous chunks and
shuffle only within a 1024-sample buffer; a global per-epoch permutation is what the contract
promises. The pipeline is rebuilt per epoch (seeded by seed, epoch and rank), so ``set_epoch(e)``
gives epoch ``e``'s order and augmentations whatever came before.

Bad files: DALI fails a whole batch without naming the file, so on a pipeline error the loader
decodes the files around the failing batch with PIL to find and name them; under ``skip`` it drops
them and restarts the pipeline at the same place in the epoch (nothing yielded twice or lost).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import objstore, shards
from .backend import Backend
from .contract import (
    MEAN,
    STD,
    BaseLoader,
    FolderIndex,
    LoaderConfig,
    LoaderError,
    available_cores,
    rank_share,
    require_batches_read,
    require_same,
    scan_imagefolder,
    shard_sizes,
)
from .images import decode_problem

DECODES = ("auto", "gpu", "cpu")
READERS = ("file", "wds")


@dataclass(frozen=True)
class Options:
    decode: str = "auto"  # auto: nvJPEG on CUDA, CPU otherwise | gpu | cpu ("dali-cpu")
    num_threads: int | None = None  # DALI CPU threads; default: the cores
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100), GPU decode only
    prefetch_queue_depth: int = 2
    reader: str = (
        "file"  # file: the ImageFolder's JPEGs | wds: the wds backend's tar shards (fn.readers.webdataset)
    )
    # nvJPEG's buffers, GPU decode only (NVIDIA's ResNet-50 example: 211025920 and 140544512 bytes, and
    # hints of 5980 x 6430 for ImageNet's largest image): grown once instead of reallocated per batch
    device_memory_padding: int = 0
    host_memory_padding: int = 0
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0
    antialias: bool = True  # False: resize without antialiasing (faster; an augmentation change)


class DaliBackend(Backend):
    name = "dali"
    summary = "NVIDIA DALI: nvJPEG decode + GPU augmentation (CPU pipeline without CUDA)"
    Options = Options
    requires = ("nvidia.dali",)
    knobs = {"workers": "num_threads", "prefetch": "prefetch_queue_depth"}
    min_workers = 1
    prefetch_values = (1, 2, 3, 4)
    reads_s3 = True

    def build(self, cfg: LoaderConfig, opts: Options) -> DaliLoader:
        if opts.decode not in DECODES:
            raise LoaderError(f"dali option decode must be one of {', '.join(DECODES)}, got {opts.decode!r}")
        if opts.decode == "gpu" and cfg.device.type != "cuda":
            raise LoaderError(
                "dali decode='gpu' needs a CUDA device; this run's device is "
                f"{cfg.device} (use decode='cpu' or 'auto')"
            )
        if opts.num_threads is not None and opts.num_threads < 1:
            raise LoaderError(f"dali num_threads must be >= 1, got {opts.num_threads}")
        if not 0.0 <= opts.hw_decoder_load <= 1.0:
            raise LoaderError(f"dali hw_decoder_load must be within 0..1, got {opts.hw_decoder_load}")
        if opts.prefetch_queue_depth < 1:
            raise LoaderError(f"dali prefetch_queue_depth must be >= 1, got {opts.prefetch_queue_depth}")
        gpu_only = [
            n
            for n in (
                "device_memory_padding",
                "host_memory_padding",
                "preallocate_width_hint",
                "preallocate_height_hint",
            )
            if getattr(opts, n)
        ]
        if any(getattr(opts, n) < 0 for n in gpu_only):
            raise LoaderError(
                f"dali {gpu_only[0]} must be >= 0 (bytes or pixels), got {getattr(opts, gpu_only[0])}"
            )
        if gpu_only and not (cfg.device.type == "cuda" and opts.decode in ("auto", "gpu")):
            raise LoaderError(
                f"dali {', '.join(gpu_only)} size nvJPEG's buffers for GPU decode (decode='gpu' or 'auto' on "
                f"CUDA); this run decodes on the CPU ({cfg.device}, decode={opts.decode!r}): drop them"
            )
        if opts.reader not in READERS:
            raise LoaderError(f"dali option reader must be one of {', '.join(READERS)}, got {opts.reader!r}")
        if cfg.data is None:
            raise LoaderError("the dali backend needs data= (an ImageFolder split folder)")
        if opts.reader == "wds":
            return _build_wds(cfg, opts)
        # A bucket's images are read by DALI's own S3 reader (AWS_ENDPOINT_URL and the AWS environment).
        remote = objstore.is_url(cfg.data)
        if remote:
            _check_s3_endpoint(cfg.data)
        return DaliLoader(
            cfg, opts, objstore.scan_imagefolder(cfg.data) if remote else scan_imagefolder(cfg.data)
        )

    def stored(self, split: Path, opts: Options) -> Path:
        """With reader='wds' over an ImageFolder split, its shards (converted once); else the split."""
        if opts.reader == "wds":
            return shards.resolve_shards(Path(split), shards.Sharding(), progress=True)[0]
        return Path(split)

    def locate(self, root: Path, split: str, opts) -> Path | None:
        shard_split = opts.reader == "wds" and shards.is_shard_folder(root / split)
        return root / split if shard_split else None

    def holds(self, root: Path) -> bool:
        return shards.is_shard_folder(root / "train")

    def storage_stats(self, path: Path) -> dict | None:
        is_shards = shards.is_shard_folder(path)
        return shards.storage_stats(shards.read_manifest(path, verify=False)) if is_shards else None


def _pipeline(cfg: LoaderConfig, opts: Options, reader: dict, seed: int, gpu_decode: bool):
    """``reader``: the arguments of fn.readers.file (files, labels) or of fn.readers.webdataset (paths...)."""
    from nvidia.dali import fn, pipeline_def, types

    cuda = cfg.device.type == "cuda"
    size = cfg.image_size

    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=opts.num_threads or available_cores(),
        # Never a device id without CUDA: DALI then refuses even CPU-only pipelines.
        device_id=(cfg.device.index or 0) if cuda else None,
        seed=seed,
        prefetch_queue_depth=opts.prefetch_queue_depth,
        exec_dynamic=True,
    )
    def pipe():
        if "paths" in reader:
            jpegs, label = fn.readers.webdataset(
                ext=["jpg", "lbl"],
                dtypes=[types.UINT8, types.INT64],
                missing_component_behavior="error",
                pad_last_batch=True,
                stick_to_shard=True,
                name="Reader",
                **reader,
            )
        else:
            jpegs, label = fn.readers.file(random_shuffle=False, pad_last_batch=True, name="Reader", **reader)
        decoder = (
            dict(device="mixed", hw_decoder_load=opts.hw_decoder_load) if gpu_decode else dict(device="cpu")
        )
        if gpu_decode:  # 0: DALI's defaults
            for name in (
                "device_memory_padding",
                "host_memory_padding",
                "preallocate_width_hint",
                "preallocate_height_hint",
            ):
                if getattr(opts, name):
                    decoder[name] = getattr(opts, name)
        if cfg.train:
            images = fn.decoders.image_random_crop(
                jpegs,
                output_type=types.RGB,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                **decoder,
            )
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=opts.antialias)
            mirror = fn.random.coin_flip(probability=0.5)
        else:  # torchvision's eval: shorter side to size / 0.875, then a centre crop
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            images = fn.resize(images, resize_shorter=round(size / 0.875), antialias=opts.antialias)
            mirror = 0
        if cuda and not gpu_decode:
            images = images.gpu()  # "dali-cpu": CPU decode + crop, normalise on the GPU
        images = fn.crop_mirror_normalize(
            images,
            crop=(size, size),
            mirror=mirror,
            mean=[m * 255 for m in MEAN],
            std=[s * 255 for s in STD],
            dtype=types.FLOAT16 if cfg.dtype == torch.float16 else types.FLOAT,
            output_layout="HWC" if cfg.channels_last else "CHW",
        )
        if cuda:
            label = label.gpu()
        return images, label

    p = pipe()
    p.build()
    return p


class DaliLoader(BaseLoader):
    name = "dali"
    index_order = True  # reads epoch_indices(): loader.sampler iterates them

    def __init__(self, cfg: LoaderConfig, opts: Options, index: FolderIndex):
        super().__init__(cfg, *rank_share(len(index), cfg, cfg.data), index.classes, split_size=len(index))
        self.options = opts
        self.index = index
        self.gpu_decode = cfg.device.type == "cuda" and opts.decode in ("auto", "gpu")
        self._pipe = None

    def describe(self) -> dict:
        d = super().describe()
        cuda = self.config.device.type == "cuda"
        d.update(
            decode="gpu (nvJPEG, DALI mixed)" if self.gpu_decode else "cpu (DALI, libjpeg-turbo)",
            normalize="gpu (DALI)" if cuda else "cpu (DALI)",
            num_threads=self.options.num_threads or available_cores(),
        )
        return d

    def _start(self, order: np.ndarray, restart: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.close()
        cfg = self.config
        seed = hash((cfg.seed, self.epoch, cfg.rank, restart)) & 0x7FFF_FFFF
        files = dict(
            files=[str(p) for p in self.index.paths[order]], labels=[int(v) for v in self.index.labels[order]]
        )
        self._pipe = _pipeline(cfg, self.options, files, seed, self.gpu_decode)
        policy = LastBatchPolicy.DROP if cfg.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(
            self._pipe,
            ["images", "labels"],
            reader_name="Reader",
            last_batch_policy=policy,
            auto_reset=False,
            prepare_first_batch=False,
        )

    def _epoch_batches(self):
        self._bad: set[str] = set()
        self._epoch_order = self._left = self.epoch_indices()
        self._restarts = 0
        if not len(self._left):  # a resumed epoch that had been read to its end
            return iter(())
        return self._run(self._start(self._left, 0), self._recover)

    def _run(self, it, recover):
        """DALI's batches in the contract's form. A pipeline error goes to ``recover(exc, pos)``, with
        the samples yielded since ``it`` started; it raises, or returns the iterator to go on with
        (None: the epoch is over)."""
        pos = 0
        try:
            while it is not None:
                try:
                    out = next(it)[0]
                except StopIteration:
                    return
                except RuntimeError as exc:
                    it, pos = recover(exc, pos), 0
                    continue
                pos += out["labels"].shape[0]
                yield self._contract(out["images"], out["labels"])
        finally:
            self.close()

    def _recover(self, exc: RuntimeError, pos: int):
        """Find the bad files around the failing batch (at most prefetch_queue_depth + 1 batches ahead
        of ``pos``) with PIL; name them (stop) or restart the pipeline past them (skip)."""
        cfg, order, paths_of = self.config, self._left, self.index.paths
        window = order[pos : pos + (self.options.prefetch_queue_depth + 2) * cfg.batch_size]
        paths = sorted({str(p) for p in paths_of[window]})
        bad = [(p, why) for p, why in zip(paths, map(_problem, paths)) if why]
        if not bad:
            raise LoaderError(f"DALI pipeline failed reading {cfg.data}: {str(exc).splitlines()[0]}") from exc
        self._skip_or_raise(bad)  # raises under 'stop'
        self._bad |= {p for p, _ in bad}
        rest = order[pos:]
        left = rest[[str(paths_of[i]) not in self._bad for i in rest]]
        if cfg.train and cfg.world_size > 1 and len(left) < len(rest):
            # Fewer samples could mean fewer batches than the other ranks take (DDP would hang):
            # refill with this rank's own good samples, as padding does.
            good = self._epoch_order[[str(paths_of[i]) not in self._bad for i in self._epoch_order]]
            if len(good) == 0:
                raise LoaderError(f"every sample on rank {cfg.rank} is bad; remove the bad files")
            left = np.concatenate([left, np.resize(good, len(rest) - len(left))])
        self._left, self._restarts = left, self._restarts + 1
        return self._start(left, self._restarts) if len(left) else None

    def _contract(self, images: torch.Tensor, labels: torch.Tensor):
        cfg = self.config
        labels = labels.view(-1).to(torch.int64)  # DALI gives int32 [N, 1] (file reader), int64 [N, 1] (lbl)
        if cfg.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last
        if images.dtype != cfg.dtype:
            images = images.to(cfg.dtype)
        if images.device != cfg.device:
            images, labels = images.to(cfg.device), labels.to(cfg.device)
        return images, labels

    def close(self) -> None:
        if self._pipe is not None:
            del self._pipe  # DALI frees its threads and buffers with the pipeline
            self._pipe = None


_first_s3_endpoint: dict[int, str] = {}  # pid -> the endpoint DALI's S3 client was made for


def _check_s3_endpoint(url: str) -> None:
    """DALI 2.4 makes its S3 client once per process, at the first s3:// pipeline, and keeps that
    endpoint (measured): a later AWS_ENDPOINT_URL would be ignored without a word."""
    now = objstore.endpoint()
    first = _first_s3_endpoint.setdefault(os.getpid(), now)
    if now != first:
        raise LoaderError(
            f"dali cannot read {url} from {now}: DALI keeps the S3 endpoint of this process's first "
            f"s3:// pipeline ({first}); read from the new endpoint in a new process"
        )


def _problem(path: str) -> str | None:
    """Why the image at ``path`` (a file or an s3:// object) cannot be decoded, or None."""
    if not objstore.is_url(path):
        return decode_problem(path)
    try:
        return decode_problem(objstore.get(path))
    except objstore.MissingObject as exc:
        return str(exc)


def _build_wds(cfg: LoaderConfig, opts: Options) -> DaliShardLoader:
    if cfg.on_bad_sample == "skip":
        raise LoaderError(
            "dali reader='wds' cannot skip bad samples (DALI fails a whole batch inside its pipeline "
            "without naming the sample); use on_bad_sample='stop', or --loader wds, which skips them"
        )
    if objstore.is_url(cfg.data):
        _check_s3_endpoint(cfg.data)
    data = cfg.data if objstore.is_url(cfg.data) else Path(cfg.data)
    # a shard folder, or an ImageFolder split converted (cached) as the wds backend's default does
    data, manifest = shards.resolve_shards(data, shards.Sharding(), progress=cfg.rank == 0)
    if manifest["samples"] < cfg.world_size:
        raise LoaderError(
            f"{manifest['samples']} samples in {data} cannot be split over {cfg.world_size} ranks"
        )
    return DaliShardLoader(cfg, opts, data, manifest)


class DaliShardLoader(DaliLoader):
    """The same pipeline over the wds backend's tar shards, read by ``fn.readers.webdataset``.

    Each epoch the shard list is permuted (seed + epoch, the same on every rank) and DALI's reader
    splits the samples into ``world_size`` contiguous ranges (``shard_id=rank``, sticky, padded last
    batch). Training takes ceil(N / world_size) samples on every rank, so a rank with one sample
    fewer repeats one (at most world_size - 1 repeats in all, as the other backends); the iterator's
    ``size`` trims DALI's padded last batch. Evaluation takes each rank's range exactly.
    """

    name = "dali"
    index_order = False  # DALI's webdataset reader splits shards itself

    def __init__(self, cfg: LoaderConfig, opts: Options, folder: Path, manifest: dict):
        n = manifest["samples"]
        if cfg.train:
            per_rank, padding = shard_sizes(n, cfg.world_size, pad=True)
        else:  # DALI's own split: [floor(r n / W), floor((r + 1) n / W))
            per_rank, padding = n * (cfg.rank + 1) // cfg.world_size - n * cfg.rank // cfg.world_size, 0
        BaseLoader.__init__(self, cfg, per_rank, padding, tuple(manifest["classes"]), split_size=n)
        self.options, self.folder, self.manifest = opts, folder, manifest
        self.gpu_decode = cfg.device.type == "cuda" and opts.decode in ("auto", "gpu")
        self._pipe = None

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            shards=len(self.manifest["shards"]),
            shard_folder=str(self.folder),
            storage={**self.manifest["storage"], "sharding": self.manifest["sharding"]},
        )
        return d

    def _paths(self) -> list[Path]:
        files = [shards.shard_path(self.folder, s["file"]) for s in self.manifest["shards"]]
        if not self.config.train:
            return files
        g = torch.Generator().manual_seed(self.config.seed + self.epoch)
        return [files[i] for i in torch.randperm(len(files), generator=g).tolist()]

    def _epoch_batches(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg = self.config
        paths = self._paths()
        indexes = [str(p)[: -len(".tar")] + ".idx" for p in paths]
        reader = dict(
            paths=[str(p) for p in paths],
            shard_id=cfg.rank,
            num_shards=cfg.world_size,
            random_shuffle=cfg.train,
            initial_fill=min(1024, max(2, self.num_samples)),
        )
        remote = objstore.is_url(self.folder)  # the manifest lists a shard's index when it was written
        if (remote and self.manifest.get("dali_index")) or all(Path(i).is_file() for i in indexes):
            reader["index_paths"] = indexes  # else DALI infers the index (slower to start)
        self.close()
        seed = hash((cfg.seed, self.epoch, cfg.rank)) & 0x7FFF_FFFF
        self._pipe = _pipeline(cfg, self.options, reader, seed, self.gpu_decode)
        policy = LastBatchPolicy.DROP if cfg.drop_last else LastBatchPolicy.PARTIAL
        with warnings.catch_warnings():
            # DALI warns that an explicit size can miss or repeat samples across its epochs; this
            # pipeline lives for one epoch, and size is what trims it to exactly this rank's share.
            warnings.filterwarnings("ignore", message="Please set `reader_name`")
            it = DALIGenericIterator(
                self._pipe,
                ["images", "labels"],
                size=self.num_samples,
                last_batch_policy=policy,
                last_batch_padded=True,
                auto_reset=False,
                prepare_first_batch=False,
            )
        resumed = self._resumed_from
        self._skipped = resumed["batches_read"] if resumed else 0
        for _ in range(self._skipped):  # DALI's readers cannot seek: a resumed epoch decodes up to its place
            next(it)
        return self._run(it, self._failed)

    _skipped = 0  # batches of the epoch a resumed state had read already

    def _own_state(self) -> dict:
        return {"batches_read": self._skipped + self._taken}

    def _check_geometry(self, state: dict) -> None:
        # DALI's webdataset reader splits the shard sequence into contiguous per-rank ranges and
        # shuffles behind a buffer: a place in it holds only for the same ranks and batch size.
        cfg = self.config
        mine = dict(world_size=cfg.world_size, batch_size=cfg.batch_size, drop_last=cfg.drop_last)
        why = "dali reader='wds' continues an epoch only with the same ranks and batch size (DALI splits the shards into per-rank ranges)"
        require_same(state, mine, why)
        require_batches_read(state, len(self))

    def _failed(self, exc: RuntimeError, pos: int):
        raise LoaderError(
            f"DALI failed reading the shards in {self.folder}: {str(exc).splitlines()[0]} "
            "(--loader wds reads the same shards and names a bad sample)"
        ) from exc
