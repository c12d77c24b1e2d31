"""One table of protocol and bad-input cases (tests/resumable_cases.py), run through both drivers.

The WSGI endpoint is called with a plain environ, the ASGI endpoint with the
stdlib harness of tests/test_asgi.py: the same requests, the same statuses,
headers and stored bytes.
"""

from __future__ import annotations

import http.client
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.resumable_cases import CASES, MAX_SIZE, Case
from tests.test_asgi import call
from uploadguard.config import Settings
from uploadguard.resumable import ResumableUploads
from uploadguard.resumable.asgi import ResumableUploads as AsgiResumableUploads

Answer = tuple[int, dict[str, str]]


class Driver(Protocol):
    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes | None,
                 chunked: bool) -> Answer: ...


def wsgi_driver(endpoint: ResumableUploads) -> Driver:
    def request(method: str, path: str, headers: dict[str, str], body: bytes | None, chunked: bool) -> Answer:
        environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "",
                                   "wsgi.input": io.BytesIO(body or b""), "SERVER_PROTOCOL": "HTTP/1.1"}
        for name, value in headers.items():
            key = "CONTENT_TYPE" if name.lower() == "content-type" else "HTTP_" + name.upper().replace("-", "_")
            environ[key] = value
        if body is not None and not chunked:
            environ["CONTENT_LENGTH"] = str(len(body))
        if chunked:
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
            environ["wsgi.input_terminated"] = True
        answered: list[Any] = []
        b"".join(endpoint(environ, lambda status, sent, exc_info=None: answered.extend([status, sent])))
        return int(answered[0].split()[0]), {name.lower(): value for name, value in answered[1]}
    return request


def asgi_driver(endpoint: AsgiResumableUploads) -> Driver:
    def request(method: str, path: str, headers: dict[str, str], body: bytes | None, chunked: bool) -> Answer:
        chunks = [body[i:i + 2] for i in range(0, len(body), 2)] if body else None  # in pieces, as they arrive
        sent = dict(headers)
        if body is not None and not body:
            sent["Content-Length"] = "0"
        result = call(endpoint, method=method, path=path, headers=sent, chunks=chunks, chunked=chunked)
        assert result.status is not None
        return result.status, result.headers
    return request


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, passing over interim responses (it skips only ``100``): the ``104`` of an IETF creation."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()
            if not 101 < status < 200:
                return version, status, reason
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]


def http_driver(port: int) -> Driver:
    """Requests over a socket to a real server on 127.0.0.1."""

    def request(method: str, path: str, headers: dict[str, str], body: bytes | None, chunked: bool) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.response_class = _FinalResponse
        try:
            if chunked:
                connection.request(method, path, body=iter([body or b""]), headers=headers, encode_chunked=True)
            else:
                connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status, {name.lower(): value for name, value in response.getheaders()}
        finally:
            connection.close()
    return request


@pytest.fixture(scope="module", params=["uvicorn", "gunicorn"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The ASGI endpoint (tests/resumable_asgi_apps.py:cases_app) under uvicorn or gunicorn -k asgi, for the module."""
    from tests.test_resumable_asgi import Served

    served = Served(request.param, tmp_path_factory.mktemp(f"cases-{request.param}"), "cases_app")
    yield served
    served.server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_case_on_a_real_server(live: Any, case: Case) -> None:
    """Each case gets the same answers from the ASGI endpoint under uvicorn and gunicorn -k asgi."""
    run_case((http_driver(live.port), live.storage), case)


@pytest.fixture(params=["wsgi", "asgi"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Driver, Path]:
    storage = tmp_path / "uploads"
    settings = Settings.from_environ({}, temp_dir=tmp_path / "tmp", min_free_space=0)
    options: dict[str, Any] = dict(storage=storage, max_size=MAX_SIZE, settings=settings,
                                   cors_origins=["https://app.example"], lock_timeout=0.3)
    if request.param == "wsgi":
        return wsgi_driver(ResumableUploads(**options)), storage
    return asgi_driver(AsgiResumableUploads(**options)), storage


def _fill(text: str, saved: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: saved[match.group(1)], text)


@pytest.mark.parametrize("case", CASES)
def test_case(driver: tuple[Driver, Path], case: Case) -> None:
    """Each request of the case gets its status and headers, and the upload holds the bytes the case says."""
    run_case(driver, case)


def run_case(driver: tuple[Driver, Path], case: Case) -> None:
    send, storage = driver
    saved: dict[str, str] = {}
    for number, step in enumerate(case.steps):
        headers = {name: _fill(value, saved) for name, value in step.headers.items()}
        status, answer = send(step.method, _fill(step.path, saved), headers, step.body, step.chunked)
        assert status == step.status, f"step {number} ({step.method} {step.path}): {status}, {answer}"
        for name, value in step.expect.items():
            assert answer.get(name.lower()) == (None if value is None else _fill(value, saved)), (number, name, answer)
        if step.save is not None:
            saved[step.save] = answer["location"]
    if case.stored is not ...:
        data = storage / (saved["url"].rsplit("/", 1)[1] + ".bin")
        assert (data.read_bytes() if data.exists() else None) == case.stored
