"""GET rate of S3 clients for PyTorch, one image per request, against the endpoint in AWS_ENDPOINT_URL:
boto3 and s3torchconnector (its S3MapDataset), one request at a time and 16 in flight (threads).
Prints one JSON line per client: {"client", "in_flight", "objects", "seconds", "gets_per_s",
"client_cpu_ms_per_get"} (CPU of this process, all threads: what the client costs a data worker).
    python scripts/s3-clients.py s3://bucket/prefix/ N_OBJECTS ORDER(0|1)"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def boto3_reader(urls):
    from loaders import objstore

    return lambda i: objstore.get(urls[i])


def s3tc_reader(urls, region: str = "us-east-1"):
    import os

    from s3torchconnector import S3MapDataset

    ds = S3MapDataset.from_objects(urls, region=region, endpoint=os.environ["AWS_ENDPOINT_URL"])
    return lambda i: ds[i].read()


def measure(read, n: int, in_flight: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, every thread: the client's own cost)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if in_flight == 1:
        total = sum(len(read(i)) for i in range(n))
    else:
        with ThreadPoolExecutor(in_flight) as pool:
            total = sum(len(b) for b in pool.map(read, range(n)))
    assert total > 0
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    from loaders import objstore

    prefix, n, order = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    urls = [objstore.join(prefix, k) for k in sorted(objstore.listing(prefix))][:n]
    clients = [("boto3", boto3_reader(urls)), ("s3torchconnector", s3tc_reader(urls))]
    if order:
        clients.reverse()
    for name, read in clients:
        for in_flight in (1, 16):
            s, cpu = measure(read, len(urls), in_flight)
            print(
                json.dumps(
                    {
                        "client": name,
                        "in_flight": in_flight,
                        "objects": len(urls),
                        "seconds": s,
                        "gets_per_s": len(urls) / s,
                        "client_cpu_ms_per_get": 1e3 * cpu / len(urls),
                    }
                )
            )


if __name__ == "__main__":
    main()
