"""The deploy files in examples/deploy/, checked by the tools that will run them.

systemd units through ``systemd-analyze verify``, the tmpfiles.d rule through
``systemd-tmpfiles --create/--clean --root=``, the nginx site through
``nginx -t`` -- and end to end: real nginx in front of real gunicorn and the
guard on loopback, where the 200 MB limit must agree at both layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import IS_ROOT, ROOT, Gunicorn, free_port, needs_root, wait_for_port
from uploadguard.config import Settings, format_size

DEPLOY = ROOT / "examples" / "deploy"
SERVICE = DEPLOY / "myapp.service"
UPLOADS_SERVICE = DEPLOY / "myapp-uploads.service"
CHECK_SERVICE = DEPLOY / "uploadguard-check-disk.service"
CHECK_TIMER = DEPLOY / "uploadguard-check-disk.timer"
TMPFILES = DEPLOY / "myapp.tmpfiles.conf"
SITE = DEPLOY / "myapp.nginx.conf"
SHIPPED_VENV_BIN = "/srv/myapp/venv/bin/"
MiB = 1024 * 1024
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def tool(name: str) -> str:
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package: {'nginx-light' if name == 'nginx' else 'systemd'})")
    return found


def render(text: str, replacements: dict[str, str]) -> str:
    """Replace literal strings, each of which must occur in the file (so the test follows the file)."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the file"
        text = text.replace(old, new)
    return text


def unit_values(path: Path) -> dict[str, list[str]]:
    """Key -> values of a systemd unit (keys may repeat, as Environment= does)."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def environment(path: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for item in unit_values(path)["Environment"])


def nginx_directive(name: str) -> str:
    """The one value of ``name`` in the site file, wherever (and however often) it is set."""
    values = set(re.findall(rf"^\s*{name}\s+([^;]+);", SITE.read_text(), re.MULTILINE))
    assert len(values) == 1, f"{name}: {values}"
    return values.pop()


def nginx_location(path: str) -> str:
    """The text of the site's ``location <path> { ... }`` block."""
    match = re.search(rf"^\s*location {re.escape(path)} {{(.*?)^\s*}}", SITE.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"no location {path}"
    return match.group(1)


class TestSystemdUnits:
    def verify(self, tmp_path: Path, texts: dict[str, str]) -> subprocess.CompletedProcess[str]:
        for name, text in texts.items():
            (tmp_path / name).write_text(text)
        return subprocess.run([tool("systemd-analyze"), "verify", *(str(tmp_path / name) for name in texts)],
                              capture_output=True, text=True, timeout=60)

    def test_units_verify_without_a_word(self, tmp_path: Path) -> None:
        """systemd-analyze verify accepts the units without a word (ExecStart pointed at this venv's commands)."""
        venv_bin = str(Path(sys.executable).parent) + "/"
        texts = {path.name: render(path.read_text(), {SHIPPED_VENV_BIN: venv_bin})
                 for path in (SERVICE, UPLOADS_SERVICE, CHECK_SERVICE)}
        texts[CHECK_TIMER.name] = CHECK_TIMER.read_text()
        proc = self.verify(tmp_path, texts)
        assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")

    def test_verify_would_see_a_typo(self, tmp_path: Path) -> None:
        """The check above can fail: verify reports a misspelled setting (with exit 0, hence the no-output rule)."""
        venv_bin = str(Path(sys.executable).parent) + "/"
        text = render(SERVICE.read_text(), {SHIPPED_VENV_BIN: venv_bin, "PrivateTmp=": "PrivateTemp="})
        proc = self.verify(tmp_path, {SERVICE.name: text})
        assert "Unknown key 'PrivateTemp'" in proc.stdout + proc.stderr

    def test_the_files_agree(self) -> None:
        """One temp dir everywhere: the unit's environment, CacheDirectory=, TMPDIR, tmpfiles.d and check-disk."""
        unit = unit_values(SERVICE)
        env = environment(SERVICE)
        temp_dir = env["UPLOADGUARD_TEMP_DIR"]
        assert temp_dir == "/var/cache/" + unit["CacheDirectory"][0] == env["TMPDIR"]
        assert unit["CacheDirectoryMode"] == ["0700"]
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/run/" + unit["RuntimeDirectory"][0]
        assert unit["PrivateTmp"] == ["true"]
        [rule] = [line.split() for line in TMPFILES.read_text().splitlines() if line and not line.startswith("#")]
        assert rule == ["d", temp_dir, "0700", unit["User"][0], unit["Group"][0], "24h"]
        check = unit_values(CHECK_SERVICE)["ExecStart"][0].split()
        body_temp = nginx_directive("client_body_temp_path").split()[0]
        assert check[1:] == ["check-disk", temp_dir, body_temp, "--max-used", "80"]

    def test_the_uploads_unit_is_the_same_project_on_the_asgi_worker(self) -> None:
        """myapp-uploads.service runs the site's gunicorn configuration with -k asgi on the port nginx's
        upstream myapp_uploads names, with the site's user, temp dir and limits, and metrics of its own."""
        site, uploads = unit_values(SERVICE), unit_values(UPLOADS_SERVICE)
        [site_exec], [uploads_exec] = site["ExecStart"], uploads["ExecStart"]
        config = re.search(r"-c (\S+)", site_exec)
        assert config is not None and f"-c {config.group(1)} -k asgi " in uploads_exec
        [upstream] = re.findall(r"upstream myapp_uploads {\s*server ([^;]+);", SITE.read_text())
        assert f"--bind {upstream} " in uploads_exec and upstream != "127.0.0.1:8000"
        assert "proxy_pass http://myapp_uploads;" in nginx_location("/files/")
        site_env, uploads_env = environment(SERVICE), environment(UPLOADS_SERVICE)
        for name in ("UPLOADGUARD_TEMP_DIR", "TMPDIR", "UPLOADGUARD_MAX_BODY_SIZE", "UPLOADGUARD_MIN_FREE_SPACE"):
            assert uploads_env[name] == site_env[name], name
        for key in ("User", "Group", "CacheDirectory", "WorkingDirectory"):
            assert uploads[key] == site[key], key
        assert uploads_env["UPLOADGUARD_RESUMABLE_STORAGE"] == "/var/lib/" + uploads["StateDirectory"][0]
        assert uploads["RuntimeDirectory"] != site["RuntimeDirectory"]  # each service removes its own at stop
        assert uploads_env["PROMETHEUS_MULTIPROC_DIR"] == "/run/" + uploads["RuntimeDirectory"][0]

    def test_the_uploads_unit_recycles_its_event_loops_rarely_and_spread(self) -> None:
        """An event-loop worker serves hundreds of requests at once: the uploads unit recycles at 20 times the
        site's max_requests or more, with a jitter of at least half of it, so its workers do not stop accepting together."""
        site_default = 500  # gunicorn_conf.py's max_requests, which the site unit keeps
        assert "GUNICORN_MAX_REQUESTS" not in environment(SERVICE)
        uploads_env = environment(UPLOADS_SERVICE)
        max_requests = int(uploads_env.get("GUNICORN_MAX_REQUESTS", site_default))
        jitter = int(uploads_env.get("GUNICORN_MAX_REQUESTS_JITTER", 100))
        assert max_requests >= 20 * site_default and jitter >= max_requests // 2

    def test_gunicorn_config_module_exists(self) -> None:
        """ExecStart's `-c python:uploadguard.gunicorn` names a module this package ships."""
        [exec_start] = unit_values(SERVICE)["ExecStart"]
        module = re.search(r"-c python:(\S+)", exec_start)
        assert module is not None
        assert (ROOT / (module.group(1).replace(".", "/") + ".py")).is_file()


class TestTmpfiles:
    def root(self, tmp_path: Path) -> Path:
        """An alternate root whose passwd knows the service user."""
        root = tmp_path / "root"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "passwd").write_text("myapp:x:990:990::/srv/myapp:/usr/sbin/nologin\n")
        (root / "etc" / "group").write_text("myapp:x:990:\n")
        return root

    @needs_root  # chown to the service user
    def test_creates_the_private_temp_dir(self, tmp_path: Path) -> None:
        """systemd-tmpfiles --create makes the upload dir, mode 0700, owned by the service user."""
        root = self.root(tmp_path)
        proc = subprocess.run([tool("systemd-tmpfiles"), "--create", f"--root={root}", str(TMPFILES)],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stderr) == (0, "")
        st = (root / "var/cache/myapp/uploads").stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o700, 990, 990)

    @pytest.mark.slow
    @needs_root  # chown to the service user
    def test_ages_old_files(self, tmp_path: Path) -> None:
        """systemd-tmpfiles --clean removes what is older than the age (2 s here for speed) and keeps fresh files."""
        root = self.root(tmp_path)
        fast = tmp_path / "fast.conf"
        fast.write_text(render(TMPFILES.read_text(), {" 24h": " 2s"}))
        subprocess.run([tool("systemd-tmpfiles"), "--create", f"--root={root}", str(fast)], check=True, timeout=60)
        uploads = root / "var/cache/myapp/uploads"
        (uploads / "left-by-a-killed-worker").write_bytes(b"x")
        (uploads / "sub").mkdir()
        (uploads / "sub" / "old").write_bytes(b"x")
        time.sleep(2.5)  # ctime cannot be set back, so the files really age
        (uploads / "fresh").write_bytes(b"x")
        subprocess.run([tool("systemd-tmpfiles"), "--clean", f"--root={root}", str(fast)], check=True, timeout=60)
        assert [p.name for p in uploads.iterdir()] == ["fresh"]


class TestNginxSite:
    def test_limits_and_timeouts_agree_with_the_guard(self) -> None:
        """nginx's client_max_body_size is the guard's default limit, and its proxy timeouts gunicorn's 600 s."""
        default = Settings.from_environ({}).max_body_size
        assert nginx_directive("client_max_body_size") == format_size(default) == "200M"
        assert environment(SERVICE)["UPLOADGUARD_MAX_BODY_SIZE"] == "200M"
        assert "proxy_request_buffering on;" in nginx_location("/")
        # Resumable PATCHes stream through, so the bytes of a cut connection count.
        assert "proxy_request_buffering off;" in nginx_location("/files/")
        import uploadguard.gunicorn

        assert nginx_directive("proxy_read_timeout") == nginx_directive("proxy_send_timeout") == \
            f"{uploadguard.gunicorn.timeout}s" == "600s"

    def test_nginx_accepts_the_site(self, tmp_path: Path) -> None:
        """nginx -t accepts the site file included from a minimal nginx.conf."""
        conf = NginxConf(tmp_path, SITE.read_text(), listen=free_port(), upstream=8000)
        proc = subprocess.run(conf.command("-t"), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "test is successful" in proc.stderr


class NginxConf:
    """The shipped site rendered for loopback ports and tmp_path, inside a minimal main nginx.conf."""

    def __init__(self, tmp_path: Path, site: str, *, listen: int, upstream: int, limit: str | None = None,
                 uploads: int | None = None) -> None:
        """``uploads``: the port of the /files/ service (upstream myapp_uploads); ``None``: ``upstream`` serves both."""
        self.prefix = tmp_path / "nginx"
        self.prefix.mkdir()
        self.port = listen
        replacements = {
            "listen 80;": f"listen 127.0.0.1:{listen};",
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream};",
            "server 127.0.0.1:8001;": f"server 127.0.0.1:{uploads or upstream};",
            "/var/lib/nginx/myapp-body": str(self.prefix / "body"),
        }
        if limit is not None:
            replacements["client_max_body_size 200M;"] = f"client_max_body_size {limit};"
        (self.prefix / "site.conf").write_text(render(site, replacements))
        temp_paths = "".join(f"    {kind}_temp_path {self.prefix / kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.prefix / "nginx.conf").write_text(
            ("user root;\n" if IS_ROOT else "")  # workers must reach tmp_path (mode 0700)
            + f"pid {self.prefix / 'nginx.pid'};\nerror_log {self.prefix / 'error.log'};\nevents {{}}\n"
            + f"http {{\n    access_log {self.prefix / 'access.log'};\n{temp_paths}"
            + f"    include {self.prefix / 'site.conf'};\n}}\n")

    def command(self, *args: str) -> list[str]:
        return [tool("nginx"), "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                "-c", str(self.prefix / "nginx.conf"), *args]


@contextlib.contextmanager
def running_nginx(conf: NginxConf) -> Iterator[None]:
    proc = subprocess.Popen(conf.command("-g", "daemon off;"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_port(conf.port, timeout=20)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()


def upload(port: int, size: int) -> tuple[int, dict[str, str], bytes, str]:
    """POST ``size`` bytes, streamed with a Content-Length; returns status, headers, body, the body's sha256."""
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        block = b"u" * MiB
        left = size
        while left:
            part = block[: min(left, MiB)]
            digest.update(part)
            left -= len(part)
            yield part

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/upload", body=body(),
                     headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), digest.hexdigest()
    finally:
        conn.close()


def headers_only(port: int, size: int, *, path: str = "/upload", body: bytes = b"", timeout: float = 20) -> bytes:
    """Announce a body of ``size`` bytes, send ``body`` (nothing: the default) and read the response head."""
    request = (f"{'PATCH' if path.startswith('/files/') else 'POST'} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
    return head


@contextlib.contextmanager
def stack(tmp_path: Path, *, limit: str | None) -> Iterator[tuple[NginxConf, Gunicorn]]:
    """gunicorn (the unit's config module) serving the guarded spool app, with the shipped nginx site in front."""
    tool("nginx")
    env = {"UPLOADGUARD_TEMP_DIR": str(tmp_path / "uploads"), "UPLOADGUARD_MIN_FREE_SPACE": "0"}
    if limit is not None:
        env["UPLOADGUARD_MAX_BODY_SIZE"] = limit
    gunicorn = Gunicorn("wsgi_apps:guarded", tmp_path=tmp_path, config="python:uploadguard.gunicorn", env=env)
    try:
        conf = NginxConf(tmp_path, SITE.read_text(), listen=free_port(), upstream=gunicorn.port, limit=limit)
        with running_nginx(conf):
            yield conf, gunicorn
    finally:
        gunicorn.stop()


@pytest.mark.slow
class TestNginxInFront:
    def test_limits_agree_at_both_layers(self, tmp_path: Path) -> None:
        """Exactly the limit passes nginx and the guard; one byte more: nginx's 413, and the guard's directly."""
        with stack(tmp_path, limit="8M") as (nginx, gunicorn):
            status, _, body, sha = upload(nginx.port, 8 * MiB)
            assert status == 200 and json.loads(body) == {"size": 8 * MiB, "sha256": sha}

            status, headers, body, _ = upload(nginx.port, 8 * MiB + 1)
            assert status == 413 and headers["server"].startswith("nginx")
            status, headers, body, _ = upload(gunicorn.port, 8 * MiB + 1)
            assert status == 413 and headers["server"].startswith("gunicorn") and b"8M" in body
            requests_seen = gunicorn.log().count('"POST /upload HTTP/1.0"')
        assert requests_seen == 1  # only the accepted body came through nginx

    def test_shipped_200M(self, tmp_path: Path) -> None:
        """As shipped, 200 MiB go through nginx and the guard; 200 MiB + 1 get nginx's 413 before the body is sent."""
        with stack(tmp_path, limit=None) as (nginx, _):
            started = time.monotonic()
            status, _, body, sha = upload(nginx.port, 200 * MiB)
            print(f"200 MiB through nginx and gunicorn: {time.monotonic() - started:.1f} s")
            assert status == 200 and json.loads(body) == {"size": 200 * MiB, "sha256": sha}
            response = headers_only(nginx.port, 200 * MiB + 1)
        assert response.startswith(b"HTTP/1.1 413 ") and b"Server: nginx" in response

    def test_one_client_holds_at_most_four_resumable_streams(self, tmp_path: Path) -> None:
        """Four requests to /files/ that are still sending their bodies: a fifth from the same address gets
        nginx's 503 at once (limit_conn), so one client cannot take every stream slot of the host."""
        with stack(tmp_path, limit=None) as (nginx, _):
            held = []
            try:
                for _ in range(4):
                    sock = socket.create_connection(("127.0.0.1", nginx.port), timeout=20)
                    sock.sendall(b"PATCH /files/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
                                 b"Content-Type: application/offset+octet-stream\r\n\r\n" + bytes(1000))
                    held.append(sock)
                fifth = b""
                deadline = time.monotonic() + 20
                while not fifth.startswith(b"HTTP/1.1 503") and time.monotonic() < deadline:
                    # nginx counts a held request once it has read its head: ask until all four count.
                    with contextlib.suppress(TimeoutError):  # forwarded: it holds a connection too
                        fifth = headers_only(nginx.port, 10, path="/files/y", body=bytes(10), timeout=3)
                assert fifth.startswith(b"HTTP/1.1 503 ") and b"Server: nginx" in fifth, fifth[:200]
            finally:
                for sock in held:
                    sock.close()



@pytest.mark.slow
class TestTwoServices:
    """The shape of myapp.service + myapp-uploads.service: nginx sends /files/ to gunicorn -k asgi, the rest
    to the WSGI site, both with the units' gunicorn configuration."""

    def test_nginx_routes_files_to_the_asgi_service(self, tmp_path: Path) -> None:
        """Through nginx, GET / is the WSGI site's answer and a tus upload to /files/ -- created, then its
        body streamed -- is stored whole by the ASGI service's resumable endpoint; the WSGI site never
        sees /files/."""
        tool("nginx")
        env = {"UPLOADGUARD_TEMP_DIR": str(tmp_path / "uploads"), "UPLOADGUARD_MIN_FREE_SPACE": "0",
               "TEST_RESUMABLE_STORAGE": str(tmp_path / "resumable"), "TEST_RECORDS": str(tmp_path / "records")}
        (tmp_path / "resumable").mkdir()
        (tmp_path / "records").mkdir()
        [site_config] = re.findall(r"-c (\S+)", unit_values(SERVICE)["ExecStart"][0])
        site = Gunicorn("wsgi_apps:guarded", tmp_path=tmp_path, config=site_config, env=env)
        uploads = None
        try:
            uploads = Gunicorn("resumable_asgi_apps:application", tmp_path=tmp_path, config=site_config, env=env,
                               args=["-k", "asgi"])
            conf = NginxConf(tmp_path, SITE.read_text(), listen=free_port(), upstream=site.port, uploads=uploads.port)
            size = 48 * 65536
            with running_nginx(conf):
                page = http.client.HTTPConnection("127.0.0.1", conf.port, timeout=20)
                page.request("GET", "/")
                response = page.getresponse()
                assert (response.status, response.read()) == (200, b"hello\n")
                page.close()
                conn = http.client.HTTPConnection("127.0.0.1", conf.port, timeout=20)
                conn.request("POST", "/files/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(size)})
                created = conn.getresponse()
                created.read()
                assert created.status == 201
                conn.request("PATCH", created.getheader("Location"), body=iter([b"a" * 65536] * 48),
                             headers={"Content-Length": str(size), "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                                      "Content-Type": "application/offset+octet-stream"})
                response = conn.getresponse()
                response.read()
                assert (response.status, response.getheader("Upload-Offset")) == (204, str(size))
                conn.close()
            [record] = (tmp_path / "records").iterdir()
            assert json.loads(record.read_text())["sha256"] == hashlib.sha256(b"a" * size).hexdigest()
            assert "/files/" not in site.log()
            assert "Traceback" not in uploads.log() + site.log()
        finally:
            if uploads is not None:
                uploads.stop()
            site.stop()
