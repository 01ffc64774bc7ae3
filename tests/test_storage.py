"""Where the data lives: page-cache eviction proven with mincore and /proc/<pid>/io, and every
backend reading from a loopback S3 store (moto) under the contract: class mapping, exact-once on
one and two ranks. Each object-store fault gives one clear line within a bounded time."""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest

from loaders import LoaderError, build_loader, get_backend, objstore, pagecache

from .conftest import available_backends, bench, decode_ids, run_ranks
from .test_conformance import CASES, collect

pytest.importorskip("moto")
pytest.importorskip("boto3")

S3_CASES = [c for c in CASES if get_backend(c.values[0]).reads_s3]
FAST = {"LOADERBENCH_S3_TIMEOUT_S": "2", "LOADERBENCH_S3_ATTEMPTS": "2"}  # faults end in seconds


# -- the page cache -------------------------------------------------------------------------------


def test_eviction_is_verified_and_cold_reads_come_from_storage(tmp_path):
    files = []
    for i in range(4):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(os.urandom(1 << 20))
        files.append(f)
    for f in files:
        f.read_bytes()
    assert pagecache.resident_fraction(files) > 0.95
    pagecache.evict(files)
    assert pagecache.resident_fraction(files) < 0.05
    before = pagecache.read_bytes()
    for f in files:
        f.read_bytes()
    read = pagecache.read_bytes() - before
    assert 0.95 * (4 << 20) <= read <= 1.5 * (4 << 20)
    assert pagecache.resident_fraction(files) > 0.95
    before = pagecache.read_bytes()  # warm now: nothing more from storage
    for f in files:
        f.read_bytes()
    assert pagecache.read_bytes() - before < (1 << 20)


def test_a_reaped_workers_reads_count_for_its_parent(tmp_path):
    """Cold figures sum DataLoader workers' reads: the kernel adds a reaped child's to its parent."""
    import multiprocessing

    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(2 << 20))
    pagecache.evict([f])
    before = pagecache.read_bytes()
    p = multiprocessing.get_context("fork").Process(target=f.read_bytes)
    p.start()
    p.join()
    assert pagecache.read_bytes() - before >= 0.95 * (2 << 20)


def test_cold_refuses_a_filesystem_that_keeps_its_pages(tmp_path):
    """tmpfs pages cannot be evicted: a "cold" figure there would be a warm one."""
    import tempfile

    from bench.errors import UsageError
    from bench.storage.regime import Evicting

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        f = Path(shm) / "x.bin"
        f.write_bytes(os.urandom(1 << 20))
        with pytest.raises(UsageError, match="stayed in the page cache after eviction"):
            Evicting(object(), [f]).set_epoch(0)


def test_bench_run_cold_records_eviction_and_bytes_read(small_data, tmp_path):
    out = tmp_path / "runs"
    args = ["run", "--data", str(small_data), "--loader-only", "--epochs", "2", "--warmup-steps", "1"]
    r = bench(*args, "--storage", "cold", "--batch-size", "32", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    storage = result["metrics"]["storage"]
    assert storage["regime"] == "cold" and result["config"]["storage"] == "cold"
    assert [e["resident_after"] for e in storage["epochs"]] == [0.0, 0.0]
    assert storage["epochs"][1]["resident_before"] > 0.9  # epoch 0 had read them all
    # two cold epochs read the split twice from storage (a little more: the interpreter's own reads)
    assert (
        1.9 * storage["dataset_bytes"]
        <= storage["bytes_read_from_disk"]
        <= 2 * storage["dataset_bytes"] + (64 << 20)
    )


# -- a loopback object store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """A loopback moto server behind the shaper, for this module (the environment points at it)."""
    from bench.storage import store

    old = {k: os.environ.get(k) for k in FAST}
    os.environ.update(FAST)
    try:
        with store.session("s3", None, "loaderbench", 0.0, 0.0) as session:
            yield session
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def uploaded(s3, probe):
    """{(backend, options id, split): URL} of the probe set as each backend reads it, uploaded."""
    from bench.storage import upload

    def url(name, opts, split):
        backend = get_backend(name)
        stored = backend.stored(probe["root"] / split, backend.options(**opts))
        return upload.upload(stored, "loaderbench", create_bucket=True, progress=False)

    return url


def test_the_shaper_delays_paces_and_counts(s3, small_data):
    """Lower bounds only (shaping can only slow a request down): 5 GETs one after another each wait
    the latency; 1 MB at 8 megabits/s takes a second; every request is counted by method."""
    from bench.storage import store, upload

    url = upload.upload(small_data / "val", "loaderbench", create_bucket=True, progress=False)
    key = sorted(objstore.listing(url))[0]
    big = objstore.join(url, "one-megabyte.bin")
    b, k = objstore.split(big)
    objstore.client().put_object(Bucket=b, Key=k, Body=os.urandom(1 << 20))
    with store.shaper(s3["endpoint"], latency_ms=200) as slow:
        os.environ["AWS_ENDPOINT_URL"], before = slow, store.shaper_stats(slow)
        try:
            start = time.monotonic()
            for _ in range(5):
                objstore.get(objstore.join(url, key))
            assert time.monotonic() - start >= 5 * 0.2
            after = store.shaper_stats(slow)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3["url"]
    assert after["requests"] - before["requests"] == 5 and after["methods"]["GET"] == 5
    with store.shaper(s3["endpoint"], mbps=8) as narrow:
        os.environ["AWS_ENDPOINT_URL"] = narrow
        try:
            start = time.monotonic()
            assert len(objstore.get(big)) == 1 << 20
            assert time.monotonic() - start >= 0.9
            assert store.shaper_stats(narrow)["response_bytes"] >= 1 << 20
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3["url"]


@pytest.mark.parametrize("name,opts", S3_CASES)
def test_every_backend_reads_the_bucket_under_the_contract(name, opts, probe, uploaded):
    """Class mapping as torchvision's, values normalised, each sample once per epoch, reshuffled."""
    from torchvision.datasets import ImageFolder

    for split, train in (("train", True), ("val", False)):
        url = uploaded(name, opts, split)
        loader = build_loader(name, url, batch_size=4, train=train, image_size=16, device="cpu", **opts)
        assert list(loader.classes) == ImageFolder(str(probe["root"] / split)).classes
        orders = []
        for epoch in range(2):
            ids, labels, batches = collect(loader, epoch)
            assert sorted(ids) == sorted(probe[split]), f"{split} epoch {epoch}: not every sample once"
            assert labels == [probe[split][i] for i in ids]
            assert batches == len(loader)
            orders.append(ids)
        assert (orders[0] != orders[1]) == train
        loader.close()


def _rank_worker(rank, world, port, name, opts, urls, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        record = {}
        for split, train in (("train", True), ("val", False)):
            loader = build_loader(
                name, urls[split], batch_size=3, train=train, image_size=16, device="cpu", **opts
            )
            record[split] = {"padding": loader.padding, "epochs": [collect(loader, e)[0] for e in range(2)]}
            loader.close()
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,opts", S3_CASES)
def test_exact_once_on_two_ranks_from_the_bucket(name, opts, probe, uploaded, tmp_path):
    urls = {split: uploaded(name, opts, split) for split in ("train", "val")}
    run_ranks(_rank_worker, 2, name, opts, urls, tmp_path)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for split in ("train", "val"):
        for epoch in range(2):
            seen = collections.Counter(i for rec in records for i in rec[split]["epochs"][epoch])
            assert set(seen) == set(probe[split])
            assert sum(seen.values()) - len(probe[split]) == records[0][split]["padding"]


def test_bench_run_wds_from_s3_counts_requests(small_data, tmp_path):
    """`bench run --loader wds --storage s3`: the store started, the shards uploaded, streamed whole
    (a request or two per shard, not one per image), and the shaper's counts in the result."""
    out = tmp_path / "runs"
    args = ["run", "--loader", "wds", "--data", str(small_data), "--storage", "s3", "--loader-only"]
    r = bench(*args, "--batch-size", "32", "--warmup-steps", "1", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    storage = result["metrics"]["storage"]
    shards = result["loader"]["shards"]
    assert storage["urls"][0].startswith("s3://loaderbench/")
    assert 1 <= storage["requests"] <= 2 * shards + 10  # listing + manifests + one GET per shard
    assert (
        storage["bytes_from_store"] >= 0.95 * storage["dataset_bytes"]
    )  # the shards (not their .idx) came over


def test_bench_run_on_two_ranks_reads_one_upload(small_data, tmp_path):
    """--cpu-ranks 2 --storage s3: the launcher's store serves both ranks; rank 0 uploads, rank 1 waits."""
    out = tmp_path / "runs"
    args = ["run", "--data", str(small_data), "--storage", "s3", "--cpu-ranks", "2", "--loader-only"]
    r = bench(
        *args, "--batch-size", "16", "--steps", "6", "--warmup-steps", "2", "--out", str(out), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert result["config"]["world_size"] == 2
    # one GET per image read by either rank (6 steps x 16 x 2 ranks), through the one shaper
    assert result["metrics"]["storage"]["requests"] >= 6 * 16 * 2


# -- faults ---------------------------------------------------------------------------------------


def _endpoint_env(monkeypatch, url):
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", **FAST}.items():
        monkeypatch.setenv(k, v)


def _read_until_the_store_dies(name: str, small: Path) -> tuple[str, str, float]:
    """In a fresh process (DALI keeps its first S3 endpoint for the process's life): read one batch,
    kill the store, read on. Returns (the store's URL, the error's text or "", seconds to it)."""
    from bench.storage import store, upload

    with store.moto_server() as (url, proc):
        os.environ["AWS_ENDPOINT_URL"] = url
        backend = get_backend(name)
        opts = {
            "torch": dict(num_workers=2),
            "wds": dict(num_workers=1, shard_samples=16),
            "dali": dict(num_threads=2),
        }[name]
        stored = backend.stored(small / "train", backend.options(**opts))
        data = upload.upload(stored, "loaderbench", create_bucket=True, progress=False)
        loader = build_loader(name, data, batch_size=2, train=False, image_size=16, device="cpu", **opts)
        it = iter(loader)
        next(it)
        proc.kill()
        proc.wait()
        start = time.monotonic()
        try:
            for _ in it:
                pass
        except LoaderError as exc:
            return url, str(exc), time.monotonic() - start
        finally:
            loader.close()
        return url, "", time.monotonic() - start


def _send_result(conn, fn, args):
    conn.send(fn(*args))


def _in_a_fresh_process(fn, *args, timeout: float = 120):
    """fn(*args) in a spawned process that may start its own (a Pool's would be daemonic)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_result, args=(theirs, fn, args))
    proc.start()
    theirs.close()
    try:
        if not ours.poll(timeout):
            raise AssertionError(f"{fn.__name__} gave no answer in {timeout} s (exit code {proc.exitcode})")
        return ours.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


@pytest.mark.parametrize("name", [n for n in ("torch", "wds", "dali") if n in available_backends()])
def test_store_killed_mid_epoch_is_one_line_naming_the_endpoint(name, small_data, tmp_cache, monkeypatch):
    """160 images in batches of 2, read in order: far more than any backend has read ahead."""
    _endpoint_env(monkeypatch, "unset")
    url, error, seconds = _in_a_fresh_process(_read_until_the_store_dies, name, small_data)
    assert f"object store at {url}" in error or f"endpoint {url}" in error, error or "no error"
    assert "\n" not in error and seconds < 30


def _dali_after_a_second_endpoint(small: Path) -> str:
    from bench.storage import store, upload

    with store.moto_server() as (a, _), store.moto_server() as (b, _):
        for url in (a, b):
            os.environ["AWS_ENDPOINT_URL"] = url
            data = upload.upload(small / "val", "loaderbench", create_bucket=True, progress=False)
        os.environ["AWS_ENDPOINT_URL"] = a
        next(iter(build_loader("dali", data, batch_size=2, train=False, device="cpu", num_threads=1)))
        os.environ["AWS_ENDPOINT_URL"] = b
        try:
            build_loader("dali", data, batch_size=2, train=False, device="cpu", num_threads=1)
        except LoaderError as exc:
            return str(exc)
        return ""


@pytest.mark.skipif("dali" not in available_backends(), reason="dali not installed")
def test_dali_refuses_a_second_endpoint_in_one_process(small_data, monkeypatch):
    """DALI 2.4 would go on reading the first endpoint: a clear error instead of the wrong store."""
    _endpoint_env(monkeypatch, "unset")
    error = _in_a_fresh_process(_dali_after_a_second_endpoint, small_data)
    assert "DALI keeps the S3 endpoint of this process's first s3:// pipeline" in error, error


@pytest.mark.skipif("ffcv" not in available_backends(), reason="ffcv not installed")
def test_ffcv_staging_from_a_dead_store_leaves_nothing(probe, tmp_cache, monkeypatch):
    from bench.storage import store, upload

    with store.moto_server() as (url, proc):
        _endpoint_env(monkeypatch, url)
        beton = get_backend("ffcv").stored(probe["root"] / "val", get_backend("ffcv").options())
        data = upload.upload(beton, "loaderbench", create_bucket=True, progress=False)
        proc.kill()
        proc.wait()
        with pytest.raises(LoaderError, match=f"cannot reach the object store at {url}"):
            build_loader("ffcv", data, batch_size=4, train=False, device="cpu")
    assert not any((tmp_cache / "staged").iterdir())  # the partial copy is gone


def test_bench_run_against_a_dead_endpoint_is_one_line_and_no_result(s3, small_data, tmp_path):
    """With a live session in the environment (the s3 fixture's), as a sweep's steps see their
    parent's: the endpoint given on the command line is the one read."""
    from bench.storage.store import _free_port

    out = tmp_path / "runs"
    inherited = {k: os.environ[k] for k in ("LOADERBENCH_S3_SESSION", "AWS_ENDPOINT_URL")}
    r = bench(
        *("run", "--data", str(small_data), "--storage", "s3", "--loader-only", "--steps", "8"),
        *("--s3-endpoint", f"http://127.0.0.1:{_free_port()}", "--out", str(out)),
        cwd=tmp_path,
        env={**FAST, **inherited, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        timeout=120,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: error: cannot reach the object store at http://127.0.0.1:"), r.stderr
    assert not out.exists() or not list(out.glob("*.json"))


def test_missing_object_bucket_and_timeout(s3, probe, uploaded, monkeypatch):
    url = uploaded("torch", {}, "val")
    key = objstore.split(url)[1] + "/bee/img_024.jpg"
    loader = build_loader("torch", url, batch_size=4, train=False, image_size=16, device="cpu")
    skipping = build_loader(
        "torch", url, batch_size=4, train=False, image_size=16, device="cpu", on_bad_sample="skip"
    )
    objstore.client().delete_object(Bucket="loaderbench", Key=key)  # listed, then gone
    with pytest.raises(LoaderError, match=f"object s3://loaderbench/{key} not found"):
        list(loader)
    assert sum(len(y) for _, y in skipping) == len(probe["val"]) - 1
    assert skipping.skipped == [f"s3://loaderbench/{key}"]

    with pytest.raises(LoaderError, match="bucket 'no-such-bucket' does not exist"):
        build_loader("torch", "s3://no-such-bucket/x", batch_size=4, train=False)
    with pytest.raises(LoaderError, match="no images under s3://loaderbench/nothing-here"):
        build_loader("torch", "s3://loaderbench/nothing-here", batch_size=4, train=False)

    from bench.storage import store

    with store.shaper(s3["endpoint"], latency_ms=3000) as slow:  # every answer after 3 s; timeout 1 s
        monkeypatch.setenv("AWS_ENDPOINT_URL", slow)
        monkeypatch.setenv("LOADERBENCH_S3_TIMEOUT_S", "1")
        start = time.monotonic()
        with pytest.raises(LoaderError, match=r"no answer within 1 s, 2 attempt"):
            objstore.get(url.rsplit("/", 1)[0] + "/x")
        assert time.monotonic() - start < 15


def test_wrong_credentials_are_named(monkeypatch):
    from bench.storage import store

    # moto checks signatures only when told to: from its first request on, here
    with store.moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as (url, _):
        _endpoint_env(monkeypatch, url)
        with pytest.raises(LoaderError, match="refused the credentials .*AWS_ACCESS_KEY_ID"):
            build_loader("torch", "s3://loaderbench/train", batch_size=4, train=False)


def test_interrupted_upload_leaves_nothing_behind(s3, small_data, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    from bench.storage import upload

    client = objstore.client()
    real, calls = client.put_object, []

    def failing(**kw):
        calls.append(kw["Key"])
        if len(calls) == 20:
            raise EndpointConnectionError(endpoint_url=s3["url"])
        return real(**kw)

    monkeypatch.setattr(client, "put_object", failing)
    bucket = "interrupted"  # a bucket of its own: other tests may have uploaded this split already
    with pytest.raises(LoaderError, match="cannot reach the object store"):
        upload.upload(small_data / "val", bucket, create_bucket=True, progress=False, threads=1)
    url = f"s3://{bucket}/{upload.key_for(small_data / 'val')}"
    assert objstore.listing(url) == {}
    assert not objstore.exists(upload.manifest_url(url))
    monkeypatch.undo()
    assert upload.upload(small_data / "val", bucket, progress=False) == url  # and a retry completes
    assert objstore.exists(upload.manifest_url(url))


def test_decoded_ids_from_the_bucket_match_the_files(probe, uploaded):
    """A sample's image is that sample's object: decode_ids of the first batch names its labels' files."""
    url = uploaded("torch", {}, "val")
    images, labels = next(
        iter(build_loader("torch", url, batch_size=9, train=False, image_size=16, device="cpu"))
    )
    assert [probe["val"][i] for i in decode_ids(images)] == labels.tolist()


def test_doctor_storage_verdict_names_the_limit_and_the_remedy():
    from bench.harness.doctor import storage_verdict
    from bench.harness.spec import RunSpec

    per_image = {"images": 640, "requests": 650, "bytes_from_store": 640 * 100_000}
    lines, tries = storage_verdict(RunSpec(storage="s3"), 100.0, 400.0, 300.0, per_image)
    text = "\n".join(lines)
    assert "STORAGE-BOUND: 4.0x" in text and "10.0 MB/s" in text and "30.0 MB/s" in text
    assert "1.02 per image" in text
    assert tries[0].startswith("shards") and "s3_requests=32" in tries[1]

    lines, tries = storage_verdict(RunSpec(storage="s3"), 390.0, 400.0, 300.0, per_image)
    assert "not the limit" in lines[-1] and tries == []
    lines, tries = storage_verdict(RunSpec(storage="cold"), 100.0, 400.0, 300.0, {"images": 10})
    assert "STORAGE-BOUND" in lines[-1] and "shards" in tries[0]
    lines, tries = storage_verdict(RunSpec(), 100.0, None, 300.0, {})
    assert "warm page cache" in lines[0] and tries == []


STREAMED = [n for n in ("litdata", "mosaic") if n in available_backends()]


@pytest.mark.parametrize("name", STREAMED)
def test_bench_run_streaming_formats_from_s3_fetch_whole_chunks(name, small_data, tmp_path):
    """`bench run --loader litdata|mosaic --storage s3`: the library's own S3 client fetches whole
    chunks (a few requests, not one per image) into its cache, and the result says how much."""
    out = tmp_path / "runs"
    args = ["run", "--loader", name, "--data", str(small_data), "--storage", "s3", "--loader-only"]
    r = bench(*args, "--batch-size", "32", "--warmup-steps", "1", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    storage = result["metrics"]["storage"]
    files = result["loader"]["storage"]["files"]
    assert storage["urls"][0].startswith("s3://loaderbench/")
    assert storage["requests"] <= 3 * files + 10, storage  # listing + manifests + chunks, not images
    assert storage["bytes_from_store"] >= 0.95 * storage["dataset_bytes"]
    assert storage["staged_bytes"] >= 0.9 * storage["dataset_bytes"]
    assert result["loader"]["format"].startswith(f"loaderbench {'mds' if name == 'mosaic' else name}")


_HOLD = """
import sys, time
from loaders import build_loader
loader = build_loader(sys.argv[1], sys.argv[2], batch_size=4, image_size=16, device="cpu", num_workers=1)
next(iter(loader))
print("reading", flush=True)
time.sleep(600)
"""


def _killed_while_reading(script: str, *args: str) -> None:
    import signal
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "reading"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif("mosaic" not in available_backends(), reason="mosaic not installed")
def test_a_killed_mosaic_run_does_not_break_the_next(uploaded, tmp_cache):
    """Mosaic's known trap: a run killed while reading leaves its coordination (shared memory, file
    locks) registered under its local cache folder, and the next dataset there is refused or waits
    (docs/backends.md). Our loaders read into a cache folder of their own process: after a SIGKILL
    the next run reads its whole epoch, and the dead run's folder and shared memory are gone."""
    import subprocess
    import sys

    from .conftest import REPO

    url = uploaded("mosaic", {}, "train")
    _killed_while_reading(_HOLD, "mosaic", url)
    (dead,) = (tmp_cache / "streamed").glob("mosaic-*")
    prefix = int((dead / "mosaic-shm-prefix").read_text())
    script = (
        "import sys\nfrom loaders import build_loader\n"
        "loader = build_loader('mosaic', sys.argv[1], batch_size=4, image_size=16, device='cpu', num_workers=1)\n"
        "print(sum(len(y) for _, y in loader))\nloader.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, url], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 21  # the probe's training split, whole
    assert not dead.exists(), "the dead run's cache folder was left"
    assert not list(Path("/dev/shm").glob(f"{prefix:06}_*")), "the dead run's shared memory was left"
