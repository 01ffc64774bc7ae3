"""A latency and bandwidth shaper in front of a loopback S3 endpoint, and its request counter.

Loopback answers in microseconds; a real object store's first byte comes after 10-100 ms. This
proxy holds each HTTP request for ``latency_ms`` before passing it on (so every GET's first byte
is that much later, with as many requests in flight as the client opens connections) and paces
each connection's responses to ``mbps`` megabits/s. It counts requests and bytes for the run's
result; ``GET /__shaper__`` answers those counters instead of being forwarded. It runs as its own
process (``python -m bench.storage.shaper``) so that it never takes the benchmark's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

STATS_PATH = b"/__shaper__"


class Shaper:
    def __init__(self, upstream: tuple[str, int], latency_ms: float, mbps: float):
        self.upstream = upstream
        self.latency = latency_ms / 1e3
        self.bytes_per_s = mbps * 1e6 / 8 if mbps > 0 else 0.0
        self.stats = {"requests": 0, "response_bytes": 0, "request_bytes": 0, "connections": 0, "methods": {}}
        self.tasks: set[asyncio.Task] = set()  # asyncio keeps only weak references to running tasks

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        me = asyncio.current_task()
        self.tasks.add(me)
        try:
            await self._connection(reader, writer)
        finally:
            self.tasks.discard(me)

    async def _connection(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()  # the store is gone: the client sees a refused/closed connection, as it would
            return
        back = asyncio.create_task(self._responses(up_reader, writer))
        self.tasks.add(back)
        back.add_done_callback(self.tasks.discard)
        try:
            await self._requests(reader, writer, up_writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            up_writer.close()
            await asyncio.gather(back, return_exceptions=True)
            writer.close()

    async def _requests(self, reader, writer, up_writer) -> None:
        """Each request's head, then its body (Content-Length), held back by the latency."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if head.split(b" ", 2)[1:2] == [STATS_PATH]:
                body = json.dumps(self.stats).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                continue
            self.stats["requests"] += 1
            method = head.split(b" ", 1)[0].decode("ascii", "replace")
            self.stats["methods"][method] = self.stats["methods"].get(method, 0) + 1
            length, chunked = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
                elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if self.latency:
                await asyncio.sleep(self.latency)
            up_writer.write(head)
            self.stats["request_bytes"] += len(head)
            if chunked:  # not parsed: pass the rest of the connection through as it comes
                while data := await reader.read(1 << 16):
                    up_writer.write(data)
                    await up_writer.drain()
                return
            while length > 0:
                data = await reader.read(min(length, 1 << 16))
                if not data:
                    return
                length -= len(data)
                self.stats["request_bytes"] += len(data)
                up_writer.write(data)
            await up_writer.drain()

    async def _responses(self, up_reader, writer) -> None:
        start, sent = time.perf_counter(), 0
        try:
            while data := await up_reader.read(1 << 16):
                self.stats["response_bytes"] += len(data)
                writer.write(data)
                await writer.drain()
                if self.bytes_per_s:  # pace this connection to the bandwidth
                    sent += len(data)
                    ahead = sent / self.bytes_per_s - (time.perf_counter() - start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def serve(port: int, upstream: tuple[str, int], latency_ms: float, mbps: float) -> None:
    shaper = Shaper(upstream, latency_ms, mbps)
    server = await asyncio.start_server(shaper.handle, "127.0.0.1", port, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)  # the port, for the process that started it
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, help="HOST:PORT of the endpoint")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--mbps", type=float, default=0.0, help="per connection; 0: unlimited")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    try:
        asyncio.run(serve(args.port, (host, int(port)), args.latency_ms, args.mbps))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
