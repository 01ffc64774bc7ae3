"""`bench data upload`: put what a backend reads (an ImageFolder split, a shard folder, a .beton)
into a bucket, once. Each object is sent with its SHA-1 (the store checks it), several at a time,
with progress; the upload's manifest is written last, so a bucket prefix without it is incomplete
and an interrupted upload removes what it had sent."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loaders import LoaderError, objstore
from loaders.stored import file_sha1

KIND = "loaderbench upload"


def key_for(local: Path) -> str:
    """The key a local split is stored under: its folder's name and its own (``synth-7415a5e7e5/train``,
    ``ffcv-0123456789ab/train.beton``): distinct for distinct datasets and conversions."""
    local = Path(local).resolve()
    return f"{local.parent.name}/{local.name}"


def manifest_url(url: str) -> str:
    return url.rstrip("/") + "." + objstore.UPLOAD_MANIFEST


def local_files(local: Path) -> list[tuple[Path, str]]:
    """(file, key below the bucket) of everything uploaded for ``local``: a folder's files, or a file
    with its sidecars (``train.beton`` and ``train.beton.json``)."""
    local = Path(local)
    base = key_for(local)
    if local.is_dir():
        return [
            (p, f"{base}/{p.relative_to(local).as_posix()}") for p in sorted(local.rglob("*")) if p.is_file()
        ]
    if not local.is_file():
        raise LoaderError(f"nothing to upload: {local} not found")
    sidecars = sorted(p for p in local.parent.glob(local.name + ".*") if p.is_file())
    return [(local, base)] + [(p, f"{local.parent.name}/{p.name}") for p in sidecars]


def _create_bucket(bucket: str) -> None:
    from botocore import exceptions as bx

    client = objstore.client()
    try:
        client.head_bucket(Bucket=bucket)
    except bx.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise objstore.explain(exc, f"s3://{bucket}/") from None
        try:
            client.create_bucket(Bucket=bucket)
        except (bx.ClientError, bx.BotoCoreError) as exc2:
            raise objstore.explain(exc2, f"s3://{bucket}/") from None
    except bx.BotoCoreError as exc:
        raise objstore.explain(exc, f"s3://{bucket}/") from None


def is_uploaded(url: str, files: list[dict]) -> bool:
    """The manifest at ``url`` lists exactly these files, and each object is there at its size."""
    try:
        manifest = json.loads(objstore.get(manifest_url(url)))
    except objstore.MissingObject:
        return False
    except ValueError:
        return False
    if manifest.get("kind") != KIND or manifest.get("files") != files:
        return False
    bucket = objstore.split(url)[0]
    listed = objstore.listing(f"s3://{bucket}/{key_for_prefix(url)}")
    prefix = key_for_prefix(url)
    return all(listed.get(f["key"][len(prefix) + 1 :]) == f["bytes"] for f in files)


def key_for_prefix(url: str) -> str:
    """The folder above ``url``'s last part (what ``listing`` is asked for)."""
    return objstore.split(url)[1].rsplit("/", 1)[0]


def upload(
    local: Path, bucket: str, create_bucket: bool = False, progress: bool = True, threads: int = 8
) -> str:
    """Upload ``local`` to ``bucket`` unless it is there already; returns its s3:// URL."""
    local = Path(local)
    url = f"s3://{bucket}/{key_for(local)}"
    pairs = local_files(local)
    entries = [{"key": k, "bytes": p.stat().st_size, "sha1": file_sha1(p)} for p, k in pairs]
    if create_bucket:
        _create_bucket(bucket)
    if is_uploaded(url, entries):
        return url
    client = objstore.client()
    sent: list[str] = []
    t0 = time.perf_counter()

    def put(item):
        (path, key), entry = item
        digest = base64.b64encode(bytes.fromhex(entry["sha1"])).decode()
        where = f"s3://{bucket}/{key}"
        with open(path, "rb") as f:
            objstore._guard(
                where, lambda: client.put_object(Bucket=bucket, Key=key, Body=f, ChecksumSHA1=digest)
            )
        sent.append(key)
        return entry["bytes"]

    from tqdm import tqdm

    total = sum(e["bytes"] for e in entries)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=f"upload {url}", disable=not progress, leave=False
    )
    try:
        with ThreadPoolExecutor(threads) as pool:
            for n in pool.map(put, zip(pairs, entries)):
                bar.update(n)
        manifest = {"kind": KIND, "source": str(local.resolve()), "files": entries, "seconds": 0.0}
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        body = json.dumps(manifest, indent=1).encode()
        digest = base64.b64encode(hashlib.sha1(body).digest()).decode()
        b, k = objstore.split(manifest_url(url))
        objstore._guard(
            manifest_url(url), lambda: client.put_object(Bucket=b, Key=k, Body=body, ChecksumSHA1=digest)
        )
    except BaseException:
        _remove(bucket, sent)  # nothing half-uploaded is left to look complete
        raise
    finally:
        bar.close()
    if progress:
        print(
            f"uploaded {local} to {url}: {len(entries)} objects, {total / 1e6:.1f} MB in {manifest['seconds']:.1f} s"
        )
    return url


def _remove(bucket: str, keys: list[str]) -> None:
    try:
        client = objstore.client()
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
    except Exception:  # the store may be the thing that failed; the missing manifest marks it incomplete
        pass


def remote(local: Path, bucket: str) -> str:
    """The URL of ``local`` in ``bucket``, checked complete (a rank never uploads; the launcher did)."""
    url = f"s3://{bucket}/{key_for(local)}"
    if not objstore.exists(manifest_url(url)):
        raise LoaderError(
            f"{url} is not uploaded (no {manifest_url(url)}): `bench data upload` puts it there"
        )
    return url
