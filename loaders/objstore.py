"""Object storage's shared layer: ``s3://bucket/key`` URLs read through boto3, for every backend.

The endpoint and credentials are the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...), so DALI's own S3 reader, forked DataLoader workers and torchrun's ranks
all see the same store. Every request is bounded: a connect and a read timeout and a few retries
with back-off (``LOADERBENCH_S3_TIMEOUT_S``, ``LOADERBENCH_S3_ATTEMPTS``), after which one
LoaderError names the object and the endpoint instead of a hang or a botocore traceback.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from .contract import FolderIndex, LoaderError

SCHEME = "s3://"
UPLOAD_MANIFEST = "loaderbench-upload.json"  # written last by `bench data upload`: the prefix is complete
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class MissingObject(LoaderError):
    """An object that is not there: a bad sample to the policy, as a missing file is."""


# (pid, endpoint, key, limits) -> client: a forked worker must not reuse its parent's sockets
_clients: dict[tuple, object] = {}


def is_url(data) -> bool:
    return isinstance(data, str) and data.startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``."""
    if not is_url(url):
        raise LoaderError(f"not an s3:// URL: {url}")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise LoaderError(f"{url}: no bucket name")
    return bucket, key


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"


def limits() -> tuple[float, int]:
    """(seconds a connect or a read may take, attempts per request)."""
    return float(os.environ.get("LOADERBENCH_S3_TIMEOUT_S", 10)), int(
        os.environ.get("LOADERBENCH_S3_ATTEMPTS", 3)
    )


def _import_boto3():
    try:
        import boto3
        import botocore.config
    except ImportError:
        raise LoaderError("reading s3:// data needs boto3: pip install 'loaderbench[s3]'") from None
    return boto3, botocore.config


def client():
    """This process's S3 client (one per process: boto3 clients are thread-safe, not fork-safe)."""
    pid = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"), limits())
    if pid not in _clients:
        boto3, config = _import_boto3()
        timeout, attempts = limits()
        _clients.clear()
        _clients[pid] = boto3.session.Session().client(
            "s3",
            region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            config=config.Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"total_max_attempts": attempts, "mode": "standard"},
                max_pool_connections=32,
            ),
        )
    return _clients[pid]


def explain(exc: Exception, url: str) -> LoaderError:
    """A boto3/botocore failure for ``url`` as one line naming the object and the endpoint."""
    from botocore import exceptions as bx

    where = f"{url} (endpoint {endpoint()})"
    timeout, attempts = limits()
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return MissingObject(f"object {url} not found (endpoint {endpoint()})")
        if code == "NoSuchBucket":
            return LoaderError(f"bucket {split(url)[0]!r} does not exist at {endpoint()} (reading {url})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
            return LoaderError(
                f"{endpoint()} refused the credentials for {url} ({code}): check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
            )
        return LoaderError(f"{where}: {code}: {err.get('Message', exc)}")
    if isinstance(exc, (bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        return LoaderError(
            f"{where}: no answer within {timeout:g} s, {attempts} attempt(s) "
            "(LOADERBENCH_S3_TIMEOUT_S / LOADERBENCH_S3_ATTEMPTS)"
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectionError)):
        return LoaderError(
            f"cannot reach the object store at {endpoint()} (reading {url}) after {attempts} attempt(s): "
            f"{type(exc).__name__}"
        )
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return LoaderError(f"no credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, (bx.BotoCoreError, OSError)):  # a stream cut mid-body (urllib3 errors are OSErrors)
        return LoaderError(f"{where}: {type(exc).__name__}: {str(exc)[:200]}")
    raise exc


def _guard(url: str, fn):
    from botocore import exceptions as bx

    try:
        return fn()
    except (bx.BotoCoreError, bx.ClientError, OSError) as exc:
        raise explain(exc, url) from None


def get(url: str) -> bytes:
    bucket, key = split(url)
    return _guard(url, lambda: client().get_object(Bucket=bucket, Key=key)["Body"].read())


def exists(url: str) -> bool:
    bucket, key = split(url)
    try:
        _guard(url, lambda: client().head_object(Bucket=bucket, Key=key))
    except MissingObject:
        return False
    return True


def listing(url: str) -> dict[str, int]:
    """{key below ``url``/ : size} of every object under the prefix ``url``."""
    bucket, prefix = split(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""

    def pages():
        found = {}
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                found[o["Key"][len(prefix) :]] = o["Size"]
        return found

    return _guard(url, pages)


class Stream:
    """A GET's body as a file object whose failures (the store gone mid-body, a read that times out)
    are LoaderErrors naming the object."""

    def __init__(self, url: str):
        bucket, key = split(url)
        self.url = url
        self.body = _guard(url, lambda: client().get_object(Bucket=bucket, Key=key)["Body"])

    def read(self, n: int = -1) -> bytes:
        return _guard(self.url, lambda: self.body.read(None if n is None or n < 0 else n))

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stage(url: str, dest: Path) -> Path:
    """Copy the object ``url`` to the local file ``dest`` (several ranged GETs in flight, as boto3's
    transfer manager does); nothing is left at ``dest`` if it fails."""
    bucket, key = split(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        _guard(url, lambda: client().download_file(bucket, key, str(tmp)))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


class Staged:
    """Objects copied to a private local folder before a loader reads them (a library that
    memory-maps its file, like FFCV, cannot read a bucket): the time it took is kept, the folder is
    removed by ``remove()``."""

    def __init__(self):
        root = Path(os.environ.get("LOADERBENCH_CACHE", Path.home() / ".cache" / "loaderbench")) / "staged"
        root.mkdir(parents=True, exist_ok=True)
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        self.seconds = 0.0
        self.bytes = 0

    def fetch(self, url: str, name: str | None = None) -> Path:
        t0 = time.perf_counter()
        path = stage(url, self.folder / (name or split(url)[1].rsplit("/", 1)[-1]))
        self.seconds += time.perf_counter() - t0
        self.bytes += path.stat().st_size
        return path

    def describe(self) -> dict:
        return {
            "staged_to": str(self.folder),
            "staging_s": round(self.seconds, 3),
            "staged_bytes": self.bytes,
        }

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def scan_imagefolder(url: str) -> FolderIndex:
    """An ImageFolder under the prefix ``url`` (``<class>/<image>`` keys), indexed as torchvision
    indexes the same folder on disk: classes sorted, images sorted within each class."""
    keys = sorted(
        (k for k in listing(url) if "/" in k and k.lower().endswith(IMAGE_EXTENSIONS)),
        key=lambda k: tuple(k.split("/", 1)),  # (class, file): "a-b/x" sorts after "a/x", as on disk
    )
    if not keys:
        raise LoaderError(
            f"no images under {url} (expected ImageFolder keys {url.rstrip('/')}/<class>/<image>; "
            "`bench data upload` puts a split there)"
        )
    classes = sorted({k.split("/", 1)[0] for k in keys})
    to_idx = {c: i for i, c in enumerate(classes)}
    return FolderIndex(
        root=url,
        classes=tuple(classes),
        paths=np.array([join(url, k) for k in keys]),
        labels=np.array([to_idx[k.split("/", 1)[0]] for k in keys], dtype=np.int64),
    )
