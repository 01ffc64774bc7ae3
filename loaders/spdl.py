"""`spdl` backend: Meta's SPDL (Scalable and Performant Data Loading) over the ImageFolder.

One thread pool instead of worker processes: SPDL's pipeline (source -> decode + augment -> batch ->
collate -> prefetch sink) runs each stage's tasks on threads. The decode stage is any function that
releases the GIL (``decode``):

- ``cpu`` (the default: the fastest here, reports/spdl-cpu) / ``pil``: the torch backend's
  per-sample code (loaders/images.py: libjpeg-turbo through torchvision.io, or PIL, then the seeded
  crop and flip on the tensor): the same pixels as torch, decoded on SPDL's threads instead of in
  worker processes.
- ``ffmpeg``: spdl.io's FFmpeg demux and decode with the crop, scale and flip in the decoder's
  filter graph; the crop box and flip are drawn with the same seeded RNG calls as the torch backend
  (so the augmentation distribution is torchvision's, sample for sample), eval resizes and
  centre-crops to torchvision's sizes. FFmpeg conceals a truncated JPEG by default:
  ``err_detect=explode`` makes it an error, reported under the bad-sample policy naming the file.

Sharding and epochs: ``shard_indices`` per epoch (the permutation and padding every backend shares),
tasks kept in input order, so a seed gives the same batches whatever the thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import objstore
from .backend import Backend
from .contract import (
    BaseLoader,
    LoaderConfig,
    LoaderError,
    available_cores,
    rank_share,
    scan_imagefolder,
)
from .feed import DeviceFeed
from .images import (
    DECODERS,
    BadSample,
    check_decoder,
    collate_checked,
    draw_box,
    read_bytes,
    sample,
    transform_for,
)


@dataclass(frozen=True)
class Options:
    num_threads: int | None = None  # decode/augment threads; default: the cores this process may use
    prefetch: int = 3  # batches the sink holds ready
    pin_memory: bool = False
    non_blocking: bool | None = None  # None: follow pin_memory
    device_normalize: bool = False  # uint8 batches, normalised on the device
    scale_algo: str = "bilinear"  # FFmpeg swscale filter for the resize (bilinear, bicubic, area...)
    decode: str = "cpu"  # the decode stage: cpu (torchvision.io), pil, ffmpeg (filter graph)


class SpdlBackend(Backend):
    name = "spdl"
    summary = (
        "Meta SPDL: thread pipeline (no worker processes), libjpeg-turbo or FFmpeg decode on its threads"
    )
    Options = Options
    requires = ("spdl.io", "spdl.pipeline")
    knobs = {
        "workers": "num_threads",
        "pin_memory": "pin_memory",
        "prefetch": "prefetch",
        "device_normalize": "device_normalize",
    }
    min_workers = 1
    prefetch_values = (2, 3, 6)

    @property
    def missing(self) -> list[str]:
        """The Python packages, then FFmpeg's shared libraries, which spdl.io loads on first use."""
        return super().missing or (
            [] if _libspdl_loads() else ["FFmpeg's shared libraries (apt-get install ffmpeg)"]
        )

    def install_hint(self) -> str:
        return f"{super().install_hint()} and FFmpeg 4-9's shared libraries (Debian: apt-get install ffmpeg)"

    def build(self, cfg: LoaderConfig, opts: Options) -> SpdlLoader:
        if opts.num_threads is not None and opts.num_threads < 1:
            raise LoaderError(f"spdl num_threads must be >= 1, got {opts.num_threads}")
        if opts.prefetch < 1:
            raise LoaderError(f"spdl prefetch must be >= 1, got {opts.prefetch}")
        if opts.scale_algo not in SCALE_ALGOS:
            raise LoaderError(
                f"spdl scale_algo must be one of {', '.join(SCALE_ALGOS)}, got {opts.scale_algo!r}"
            )
        check_decoder(opts.decode, "spdl", ("ffmpeg", *DECODERS))
        if opts.decode != "ffmpeg" and opts.scale_algo != Options.scale_algo:
            raise LoaderError(
                f"spdl scale_algo is FFmpeg's resize filter: it needs decode=ffmpeg, not {opts.decode!r}"
            )
        if cfg.data is None:
            raise LoaderError("the spdl backend needs data= (an ImageFolder split folder)")
        if objstore.is_url(cfg.data):
            raise LoaderError("the spdl backend reads local files; for s3:// data use torch, dali or wds")
        return SpdlLoader(cfg, opts, scan_imagefolder(cfg.data))


SCALE_ALGOS = ("fast_bilinear", "bilinear", "bicubic", "area", "lanczos")
_DECODE_NAMES = {
    "ffmpeg": "FFmpeg via spdl.io, crop/scale/flip in its filter graph",
    "cpu": "torchvision.io/libjpeg-turbo, tensor crop/flip",
    "pil": "PIL, tensor crop/flip",
}


def _libspdl_loads() -> bool:
    """Whether spdl.io finds the system's FFmpeg (libavcodec 4 to 9), which it loads on first use."""
    import spdl.io

    try:
        spdl.io.demux_config()
    except RuntimeError:
        return False
    return True


def eval_filter(height: int, width: int, size: int) -> str:
    """torchvision's Resize(round(size / 0.875)) of the shorter side + CenterCrop(size), as FFmpeg
    filters with torchvision's output sizes and offsets."""
    short = round(size / 0.875)
    if height <= width:
        h, w = short, int(short * width / height)
    else:
        h, w = int(short * height / width), short
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return f"scale={w}:{h}:flags={{algo}},crop={size}:{size}:{left}:{top}:exact=1"


class SpdlLoader(BaseLoader):
    name = "spdl"
    index_order = True  # reads epoch_indices(): loader.sampler iterates them

    def __init__(self, cfg: LoaderConfig, opts: Options, index):
        super().__init__(cfg, *rank_share(len(index), cfg, cfg.data), index.classes, split_size=len(index))
        self.options, self.index = opts, index
        self.threads = opts.num_threads or available_cores()
        decoder = "cpu" if opts.decode == "ffmpeg" else opts.decode
        self._transform = transform_for(cfg, float_in_workers=not opts.device_normalize, decoder=decoder)
        self._feed = DeviceFeed.for_options(cfg, opts)
        self._running = None  # the epoch's generator, closed by close()

    def describe(self) -> dict:
        return {
            **super().describe(),
            "decode": f"cpu ({_DECODE_NAMES[self.options.decode]}) on {self.threads} SPDL threads",
            "normalize": "device" if self.options.device_normalize else "pipeline thread",
            "pin_memory_effective": self.options.pin_memory and self.config.device.type == "cuda",
        }

    def _load(self, i: int):
        import spdl.io

        cfg, where = self.config, str(self.index.paths[i])
        if self.options.decode != "ffmpeg":  # the torch backend's per-sample code, on this thread
            return sample(self._transform, where, where, int(self.index.labels[i]), cfg.seed, self.epoch, i)
        try:
            packets = spdl.io.demux_image(read_bytes(where))
            height, width = packets.height, packets.width
            if cfg.train:
                top, left, h, w, flip = draw_box(height, width, cfg.seed, self.epoch, i)
                chain = f"crop={w}:{h}:{left}:{top}:exact=1,scale={cfg.image_size}:{cfg.image_size}:flags={self.options.scale_algo}"
                chain += ",hflip" if flip else ""
            else:
                chain = eval_filter(height, width, cfg.image_size).format(algo=self.options.scale_algo)
            frames = spdl.io.decode_packets(
                packets, filter_desc=f"{chain},format=pix_fmts=rgb24", decode_config=_STRICT()
            )
            hwc = spdl.io.to_torch(spdl.io.convert_frames(frames))
        except Exception as exc:  # FFmpeg's errors for a bad file: RuntimeError, IndexError (no frame)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no frame decoded"
            if isinstance(exc, IndexError):
                reason = "no complete frame decoded (truncated or corrupt data)"
            return BadSample(where, f"{type(exc).__name__}: {reason}")
        return hwc.permute(2, 0, 1), int(self.index.labels[i])

    def _collate(self, samples):
        images, labels, bad = collate_checked(samples, normalize=self._transform.normalize)
        if images is not None and self.options.pin_memory and self.config.device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels, bad

    def _order(self):
        cfg, order = self.config, self.epoch_indices()
        return order[: len(order) - len(order) % cfg.batch_size] if cfg.drop_last else order

    def _batches(self):
        from spdl.pipeline import PipelineBuilder, PipelineFailure

        pipeline = (
            PipelineBuilder()
            .add_source([int(i) for i in self._order()])
            .pipe(self._load, concurrency=self.threads, output_order="input", name="decode")
            .aggregate(self.config.batch_size)
            .pipe(self._collate, output_order="input", name="collate")
            .add_sink(self.options.prefetch)
            .build(num_threads=self.threads + 1, max_failures=0)
        )
        with pipeline.auto_stop():
            try:
                for images, labels, bad in pipeline.get_iterator():
                    self._skip_or_raise(bad, batch_empty=images is None)
                    if images is not None:
                        yield images, labels
            except PipelineFailure as exc:  # a stage raised (a bug: bad files are BadSamples); SPDL logged it
                raise LoaderError(
                    f"spdl pipeline stopped: {exc}; its log above has the stage's traceback"
                ) from exc

    def _epoch_batches(self):
        self.close()
        self._running = self._batches()
        return self._feed(self._running)

    def close(self) -> None:
        if self._running is not None:
            self._running.close()  # leaves auto_stop: the pipeline's threads are joined
            self._running = None


def _STRICT():
    import spdl.io

    return spdl.io.decode_config(decoder_options={"err_detect": "explode"})
