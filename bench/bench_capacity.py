"""How many phones uploading at once does each deployment hold?  WSGI (sync, gthread) vs ASGI, one run.

The shipped nginx site (``examples/deploy/myapp.nginx.conf``, rendered for loopback ports)
in front of ``gunicorn -c gunicorn_conf.py`` serving the guarded resumable endpoint and a
``/`` page, in three configurations measured the same way, one after the other:

* ``sync``    -- the default: 5 sync workers (the stream cap ``auto`` answers PATCHes past
  4 at once 503 + ``Retry-After``, so the site keeps answering);
* ``gthread`` -- 5 workers x 64 threads;
* ``asgi``    -- ``-k asgi``, 5 workers recycled as ``myapp-uploads.service`` does (20,000 +
  up to 10,000 requests): ``uploadguard.asgi.UploadGuard`` around
  ``uploadguard.resumable.asgi.ResumableUploads`` (skipped, with a message, while that module
  does not exist);
* ``asgi-pool8`` -- the same with the endpoint's store pool at 8 threads instead of its default
  (2 for a local directory): the comparison behind that default; not in the default set.

For each number of phones (``--phones 100,300,1000``): each phone comes from its own loopback
address (127.x.y.z: nginx's per-client ``limit_conn`` sees phones, not one client), arrivals
spread over ``--arrival`` seconds; it creates a tus upload (POST), PATCHes ``--size`` bytes at
``--rate`` bytes/s, and on 503/423/a broken connection waits ``Retry-After`` (1 s if none),
asks HEAD for the offset and goes on from there, until ``--deadline`` seconds.  Meanwhile a
prober process asks ``GET /`` every 100 ms (10 s timeout, counted as 10 s), and the RSS of
the gunicorn master and workers together is sampled every second.  Afterwards every upload is
checked: HEAD's offset, and the stored file's sha256 against what the phone sent; and the
``on_complete`` hook's log (one line per call) counted per upload.

Printed per configuration and phone count: intact uploads, ``on_complete`` calls (and how many
uploads got more than one), GET p50/p99/max and how many waited over 1 s, peak RSS, wall time,
and the client's own CPU (the phones are one asyncio process: when it is near a whole core, the
client, not the server, is the bottleneck).  ``--plot`` writes the PNG (matplotlib: the
``bench`` extra).

    .venv/bin/python bench/bench_capacity.py --phones 100,300 --configs sync,gthread
    .venv/bin/python bench/bench_capacity.py --phones 100,300,1000,3000 --plot bench/capacity.png
    .venv/bin/python bench/bench_capacity.py --phones 20 --size 65536 --rate 16384 --deadline 30  # smoke

Only loopback; every phone, the prober and the servers stop by ``--deadline``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import importlib.util
import multiprocessing
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import children  # noqa: E402

SITE = ROOT / "examples" / "deploy" / "myapp.nginx.conf"
PAGE = b"<!doctype html><title>myapp</title><p>the site\n"
PROBE_TIMEOUT = 10.0  # seconds; a GET that takes longer counts as this
CONFIGS = {  # name -> gunicorn arguments after -c gunicorn_conf.py
    "sync": ["--workers", "5"],
    "gthread": ["--workers", "5", "--worker-class", "gthread", "--threads", "64"],
    # recycling as examples/deploy/myapp-uploads.service sets it for the event loop (its comment says why)
    "asgi": ["--workers", "5", "--worker-class", "asgi", "--max-requests", "20000", "--max-requests-jitter", "10000"],
}
CONFIGS["asgi-pool8"] = CONFIGS["asgi"]
STORE_THREADS = {"asgi-pool8": 8}  # config -> the ASGI endpoint's ``threads`` (else its default)


# -- the applications gunicorn serves (bench.bench_capacity:wsgi_app / :asgi_app) --------------------

def _hook_log(upload: Any) -> None:
    """``on_complete``: one line per call, so the bench can count calls per upload."""
    with open(os.environ["CAPACITY_HOOK_LOG"], "a") as out:
        out.write(f"{upload.id} {os.getpid()}\n")


def _site(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE)))])
    return [PAGE]


async def _asgi_site(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html"), (b"content-length", str(len(PAGE)).encode())]})
    await send({"type": "http.response.body", "body": PAGE})


def asgi_endpoint_missing() -> str | None:
    """Why the ASGI configuration cannot run here, or ``None``."""
    try:
        found = importlib.util.find_spec("uploadguard.resumable.asgi")
    except ImportError as exc:
        return str(exc)
    return None if found is not None else "uploadguard.resumable.asgi (ResumableUploads for ASGI) does not exist yet"


def __getattr__(name: str) -> Any:
    """Server targets, made when gunicorn imports them (the storage and hook log come from the environment)."""
    storage = os.environ.get("CAPACITY_STORAGE")
    if name == "wsgi_app":
        from uploadguard import UploadGuard
        from uploadguard.resumable import ResumableUploads

        return UploadGuard(ResumableUploads(_site, storage=storage, on_complete=_hook_log))
    if name == "asgi_app":
        from uploadguard.asgi import UploadGuard as AsgiGuard
        from uploadguard.resumable.asgi import ResumableUploads as AsgiResumable

        threads = int(os.environ["CAPACITY_STORE_THREADS"]) if os.environ.get("CAPACITY_STORE_THREADS") else None
        return AsgiGuard(AsgiResumable(_asgi_site, storage=storage, on_complete=_hook_log, threads=threads))
    raise AttributeError(name)


# -- nginx -----------------------------------------------------------------------------------------

class Nginx:
    """The shipped site for loopback ports, inside a main nginx.conf sized for thousands of connections."""

    def __init__(self, prefix: Path, *, upstream: int, connections: int) -> None:
        from tests.support import free_port, wait_for_port

        self.prefix = prefix
        prefix.mkdir()
        self.port = free_port()
        site = SITE.read_text()
        for old, new in {"listen 80;": f"listen 127.0.0.1:{self.port};",
                         "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream};",
                         "server 127.0.0.1:8001;": f"server 127.0.0.1:{upstream};",  # one service serves both
                         "/var/lib/nginx/myapp-body": str(prefix / "body")}.items():
            if old not in site:
                raise RuntimeError(f"{old!r} is no longer in {SITE}")
            site = site.replace(old, new)
        (prefix / "site.conf").write_text(site)
        temp_paths = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # worker_processes auto, as in Debian's nginx.conf, under which the shipped site runs (the bench had one
        # process: one core's worth of nginx for 1,000 phones' connections and the prober's).
        (prefix / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"worker_processes auto;\nworker_rlimit_nofile {4 * connections + 1024};\n"
            + f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'};\n"
            + f"events {{ worker_connections {2 * connections + 512}; }}\n"
            + f"http {{\n    access_log off;\n{temp_paths}    include {prefix / 'site.conf'};\n}}\n")
        nginx = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
        if nginx is None:
            raise SystemExit("nginx is not installed (apt-get install nginx-light)")
        self.proc = subprocess.Popen([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"),
                                      "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, timeout=20)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _cpu_seconds(pids: list[int], seen: dict[int, float]) -> None:
    """Note in ``seen`` the utime + stime (seconds) of each of ``pids`` alive now.

    Sampled every second, the last value of a recycled worker stays in ``seen``: its CPU counts.
    """
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            seen[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the phones ------------------------------------------------------------------------------------

@dataclass
class Phone:
    index: int
    address: str
    data: memoryview
    sha256: str
    location: str = ""
    done: bool = False
    attempts: int = 0  # PATCH requests sent
    statuses: dict[str, int] = field(default_factory=dict)  # retried statuses and errors: how often

    def note(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


async def _request(phone: Phone, port: int, method: str, path: str, headers: dict[str, str],
                   body: memoryview | None = None, rate: int = 0) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 request on its own connection from the phone's address; the body at ``rate`` bytes/s.

    The answer is read while the body is still going out: a 503 or 423 sent early ends the sending.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(phone.address, 0))
    answer: asyncio.Future[tuple[int, dict[str, str]]] | None = None
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: myapp.example.com\r\nConnection: close\r\nTus-Resumable: 1.0.0\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head += f"Content-Length: {len(body) if body is not None else 0}\r\n\r\n"
        writer.write(head.encode())
        answer = asyncio.ensure_future(_response(reader, method))
        if body is not None:
            tick = 0.25  # seconds: rate/4 bytes a write
            step = max(1, int(rate * tick)) if rate else len(body)
            started = time.monotonic()
            try:
                for sent in range(0, len(body), step):
                    if answer.done():
                        break
                    writer.write(body[sent: sent + step])
                    await writer.drain()
                    if rate:
                        delay = started + (sent + step) / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.wait({answer}, timeout=delay)
            except OSError:
                pass  # the server answered early and closed: what it said (a 503's Retry-After) is read below
        return await asyncio.wait_for(answer, timeout=60)
    finally:
        if answer is not None and not answer.done():
            answer.cancel()
        elif answer is not None and not answer.cancelled():
            answer.exception()  # retrieved: a failed read is reported by the await above, or not needed
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _response(reader: asyncio.StreamReader, method: str) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length and method != "HEAD" and status not in (204, 304):
        await reader.readexactly(length)
    return status, headers


async def _pause(headers: dict[str, str]) -> None:
    try:
        wait = float(headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    await asyncio.sleep(wait * (0.5 + random.random()))  # jittered, as the clients do: no thundering herd


async def phone_uploads(phone: Phone, port: int, rate: int, start_at: float) -> None:
    """Create, PATCH at ``rate``, resume from HEAD's offset after any refusal or break, until done."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    size = len(phone.data)
    while not phone.location:
        try:
            status, headers = await _request(phone, port, "POST", "/files/", {"Upload-Length": str(size)})
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            phone.note(f"create {type(exc).__name__}")
            await asyncio.sleep(random.uniform(0.5, 1.5))
            continue
        if status == 201:
            phone.location = urlsplit(headers["location"]).path
        else:
            phone.note(f"create {status}")
            await _pause(headers)
    offset = 0
    while True:
        phone.attempts += 1
        try:
            status, headers = await _request(
                phone, port, "PATCH", phone.location,
                {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
                phone.data[offset:], rate)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            status, headers = 0, {}
            phone.note(f"patch {type(exc).__name__}")
        if status == 204 and headers.get("upload-offset") == str(size):
            phone.done = True
            return
        if status:
            phone.note(f"patch {status}")
        await _pause(headers)
        while True:  # where the server is now
            try:
                status, headers = await _request(phone, port, "HEAD", phone.location, {})
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                phone.note(f"head {type(exc).__name__}")
                await asyncio.sleep(1)
                continue
            if status == 200:
                offset = int(headers["upload-offset"])
                break
            phone.note(f"head {status}")
            await _pause(headers)
        if offset == size:
            phone.done = True  # the bytes were all in; only the answer was lost
            return


def _probe(port: int, stop: Any, out: Any) -> None:
    """A separate process: ``GET /`` every 100 ms until ``stop`` is set; sends the latencies back, and when
    (seconds since the first) each GET over 1 s was sent."""
    latencies = []
    slow_at = []
    first = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            latencies.append(time.monotonic() - started)
            if latencies[-1] > 1:
                slow_at.append(started - first)
        except (OSError, http.client.HTTPException):
            latencies.append(PROBE_TIMEOUT)
            slow_at.append(started - first)
        stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))
    out.send((latencies, slow_at))


def _payload(size: int) -> tuple[bytes, int]:
    """A random block twice over: phone ``i`` sends ``size`` bytes of it from its own offset."""
    block = os.urandom(size)
    return block + block, size


async def _drive(phones: list[Phone], port: int, rate: int, arrival: float, deadline: float,
                 watched: list[int], samples: list[int], cpu_seen: dict[int, float]) -> float:
    """Run the phones until all are done or ``deadline`` (monotonic); sample the servers' RSS and CPU every
    second; return the client's own CPU seconds."""
    cpu = time.process_time()
    start = time.monotonic()
    tasks = [asyncio.ensure_future(phone_uploads(phone, port, rate, start + arrival * i / len(phones)))
             for i, phone in enumerate(phones)]

    async def sample() -> None:
        while True:
            pids = [*watched, *[c for p in watched for c in children(p)]]
            samples.append(_rss_kib(pids))
            _cpu_seconds(pids, cpu_seen)
            await asyncio.sleep(1.0)

    sampler = asyncio.ensure_future(sample())
    await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in (*tasks, sampler):
        task.cancel()
    await asyncio.gather(*tasks, sampler, return_exceptions=True)
    return time.process_time() - cpu


def run(config: str, phones_n: int, args: argparse.Namespace) -> dict[str, Any]:
    from tests.support import GUNICORN_CONF, Gunicorn

    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "tmp").mkdir()
        hook_log = tmp_path / "hooks.log"
        hook_log.touch()
        storage = tmp_path / "uploads"
        env = {"UPLOADGUARD_TEMP_DIR": str(tmp_path / "tmp"), "UPLOADGUARD_MIN_FREE_SPACE": "0",
               "UPLOADGUARD_RESUMABLE_STORAGE": str(storage), "CAPACITY_STORAGE": str(storage),
               "CAPACITY_HOOK_LOG": str(hook_log), "PYTHONPATH": str(ROOT),
               "CAPACITY_STORE_THREADS": str(STORE_THREADS.get(config, ""))}
        server = Gunicorn(f"bench.bench_capacity:{'asgi' if config.startswith('asgi') else 'wsgi'}_app", tmp_path=tmp_path,
                          config=GUNICORN_CONF, workers=args.workers, env=env, pythonpath=[ROOT],
                          args=CONFIGS[config][2:])
        nginx = None
        try:
            nginx = Nginx(tmp_path / "nginx", upstream=server.port, connections=phones_n)
            doubled, size = _payload(args.size)
            phones = []
            for i in range(phones_n):
                offset = (i * 7919) % size
                data = memoryview(doubled)[offset: offset + size]
                phones.append(Phone(i, f"127.{1 + i // 65025}.{1 + (i // 255) % 255}.{1 + i % 255}", data,
                                    hashlib.sha256(data).hexdigest()))
            stop = multiprocessing.Event()
            receiving, sending = multiprocessing.Pipe(duplex=False)
            prober = multiprocessing.Process(target=_probe, args=(nginx.port, stop, sending), daemon=True)
            samples: list[int] = []
            cpu_before: dict[int, float] = {}
            _cpu_seconds([server.pid, *server.worker_pids()], cpu_before)
            cpu_seen = dict(cpu_before)
            nginx_before: dict[int, float] = {}
            _cpu_seconds(nginx.pids(), nginx_before)
            started = time.monotonic()
            prober.start()
            client_cpu = asyncio.run(_drive(phones, nginx.port, args.rate, args.arrival, started + args.deadline,
                                            [server.pid], samples, cpu_seen))
            wall = time.monotonic() - started
            _cpu_seconds([server.pid, *server.worker_pids()], cpu_seen)
            server_cpu = sum(cpu_seen.values()) - sum(cpu_before.values())
            stop.set()
            latencies, slow_at = receiving.recv()
            latencies.sort()
            prober.join(timeout=PROBE_TIMEOUT + 5)
            nginx_rss = _rss_kib(nginx.pids())
            nginx_after: dict[int, float] = {}
            _cpu_seconds(nginx.pids(), nginx_after)
            nginx_cpu = sum(nginx_after.values()) - sum(nginx_before.values())
        finally:
            if nginx is not None:
                nginx.stop()
            server.stop()
        intact = 0
        for phone in phones:  # after the servers stopped: the check costs the measurement nothing
            if not phone.done:
                continue
            stored = storage / (phone.location.rstrip("/").rsplit("/", 1)[1] + ".bin")
            digest = hashlib.sha256()
            with contextlib.suppress(OSError), open(stored, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            intact += digest.hexdigest() == phone.sha256
        calls: dict[str, int] = {}
        for line in hook_log.read_text().splitlines():
            calls[line.split()[0]] = calls.get(line.split()[0], 0) + 1
        traceback = "Traceback" in server.log()
        recycled = server.log().count("Autorestarting worker")  # max_requests reached
    retried: dict[str, int] = {}
    for phone in phones:
        for what, n in phone.statuses.items():
            retried[what] = retried.get(what, 0) + n
    return {
        "config": config, "phones": phones_n, "done": sum(p.done for p in phones), "intact": intact,
        "hooks": sum(calls.values()), "hooked_twice": sum(1 for n in calls.values() if n > 1),
        "gets": len(latencies), "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "max": latencies[-1] if latencies else float("nan"), "over_1s": sum(1 for v in latencies if v > 1),
        "rss_mib": max(samples, default=0) / 1024, "nginx_rss_mib": nginx_rss / 1024, "wall": wall,
        "client_cpu": client_cpu / wall, "server_cpu": server_cpu / wall, "retried": retried,
        "server_cpu_s": server_cpu, "nginx_cpu_s": nginx_cpu, "client_cpu_s": client_cpu,
        "traceback": traceback, "recycled": recycled, "slow_at": slow_at,
    }


def _row(r: dict[str, Any]) -> str:
    retried = ", ".join(f"{k} x{v}" for k, v in sorted(r["retried"].items(), key=lambda kv: -kv[1])[:3]) or "-"
    twice = f" ({r['hooked_twice']} twice)" if r["hooked_twice"] else ""
    return (f"| {r['config']} | {r['phones']} | {r['intact']}/{r['phones']} | {r['hooks']}{twice} | "
            f"{r['p50'] * 1000:.0f} | {r['p99'] * 1000:.0f} | {r['max'] * 1000:.0f} | {r['over_1s']} | "
            f"{r['rss_mib']:.0f} | {r['wall']:.0f} | {r['client_cpu']:.2f} | {r['server_cpu']:.2f} | "
            f"{r['server_cpu_s']:.0f} | {r['nginx_cpu_s']:.0f} | {r['recycled']} | "
            f"{', '.join(f'{t:.0f}' for t in r['slow_at']) or '-'} | {retried}"
            f"{' | TRACEBACK' if r['traceback'] else ''} |")


def plot(results: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, done) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"sync": "tab:red", "gthread": "tab:blue", "asgi": "tab:green", "asgi-pool8": "tab:olive"}
    counts = sorted({r["phones"] for r in results})
    for config in CONFIGS:
        rows = sorted((r for r in results if r["config"] == config), key=lambda r: r["phones"])
        if not rows:
            continue
        xs = [r["phones"] for r in rows]
        latency.plot(xs, [r["p99"] * 1000 for r in rows], marker="o", color=colors[config], label=f"{config} p99")
        latency.plot(xs, [r["max"] * 1000 for r in rows], marker="x", linestyle=":", color=colors[config],
                     label=f"{config} max")
        done.plot(xs, [100 * r["intact"] / r["phones"] for r in rows], marker="o", color=colors[config], label=config)
    latency.axhline(250, color="grey", linewidth=0.8, linestyle="--", label="p99 target 250 ms")
    latency.set(xscale="log", yscale="log", xlabel="phones uploading at once", ylabel="GET / latency (ms)",
                title="GET / every 100 ms, through nginx")
    done.set(xscale="log", ylim=(0, 105), xlabel="phones uploading at once", ylabel="% uploads intact",
             title=f"{args.size >> 10} KiB at {args.rate >> 10} KiB/s each, within {args.deadline:g} s")
    latency.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    latency.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for axis in (latency, done):
        axis.set_xticks(counts, [str(n) for n in counts])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no "2 x 10^2" between the counts
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phones", default="100,300", help="comma-separated phone counts")
    parser.add_argument("--configs", default="sync,gthread,asgi", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per upload")
    parser.add_argument("--rate", type=int, default=16 << 10, help="bytes per second per phone")
    parser.add_argument("--arrival", type=float, default=2.0, help="seconds over which the phones arrive")
    parser.add_argument("--deadline", type=float, default=150.0, help="seconds a configuration gets")
    parser.add_argument("--workers", type=int, default=5, help="gunicorn workers (5: 2 x CPUs + 1 on 2 cores)")
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    args = parser.parse_args()
    counts = [int(n) for n in args.phones.split(",")]
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * max(counts) + 4096  # each phone: its socket, nginx's two, the server's one
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    os.environ.pop("WEB_CONCURRENCY", None)
    if any(config.startswith("asgi") for config in configs) and (missing := asgi_endpoint_missing()):
        print(f"asgi: skipped -- {missing}")
        configs = [config for config in configs if not config.startswith("asgi")]
    print(f"# capacity -- {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; phones upload "
          f"{args.size >> 10} KiB at {args.rate >> 10} KiB/s, arriving over {args.arrival:g} s; "
          f"GET / every 100 ms; {args.deadline:g} s a run; {args.workers} workers; load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| config | phones | intact | on_complete | GET p50 ms | p99 ms | max ms | GETs > 1 s | gunicorn RSS MiB "
          "| wall s | client CPU | server CPU | server CPU s | nginx CPU s | workers recycled | GETs > 1 s sent at (s) | retried (top 3) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    results = []
    for count in counts:
        for config in configs:
            result = run(config, count, args)
            results.append(result)
            print(_row(result), flush=True)
    print("\nclient CPU / server CPU: cores busy on average (the phones' asyncio process; gunicorn's master and "
          "workers); server / nginx CPU s: their CPU seconds over the run, the less noisy measure of what a "
          "configuration costs. RSS: the peak of the sum over master and workers, sampled every second.")
    if args.plot:
        plot(results, args.plot, args)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
