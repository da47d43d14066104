"""vgg_ray.storage against the local disk and a real S3 protocol server (moto)."""

from __future__ import annotations

import os
import socket

import pyarrow.fs as pafs
import pytest
from conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY

from vgg_ray.errors import ConfigError
from vgg_ray.storage import exists, join, open_storage, read_bytes, write_bytes_atomic


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_no_secrets(text: str) -> None:
    assert FAKE_SECRET_KEY not in text and FAKE_ACCESS_KEY not in text


def test_local_paths_and_atomic_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = open_storage("out")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "out")
    assert open_storage(f"file://{tmp_path}/out")[1] == path

    write_bytes_atomic(fs, f"{path}/a/b.bin", b"first")
    write_bytes_atomic(fs, f"{path}/a/b.bin", b"second")  # replaces
    assert read_bytes("out/a/b.bin") == b"second"
    assert read_bytes((fs, f"{path}/a/b.bin")) == b"second"
    assert exists("out/a/b.bin") and not exists("out/a/c.bin")
    assert os.listdir(tmp_path / "out" / "a") == ["b.bin"]  # no temp file left behind


def test_missing_local_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_bytes(str(tmp_path / "absent.json"))


def test_join():
    assert join("s3://b/p/", "train", "x.parquet") == "s3://b/p/train/x.parquet"
    assert join("/data/out", "/manifest.json") == "/data/out/manifest.json"


def test_s3_round_trip(s3):
    fs, path = open_storage(s3.uri("prefix"), s3_endpoint=s3.endpoint)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{s3.bucket}/prefix"  # no s3:// with an explicit filesystem
    write_bytes_atomic(fs, f"{path}/dir/blob", b"\x00payload")
    uri = join(s3.uri("prefix"), "dir", "blob")
    assert read_bytes(uri, s3_endpoint=s3.endpoint) == b"\x00payload"
    assert exists(uri, s3_endpoint=s3.endpoint)
    assert not exists(join(s3.uri("prefix"), "dir", "other"), s3_endpoint=s3.endpoint)


def test_s3_endpoint_from_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # the S3-specific one wins
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    fs, path = open_storage(s3.uri("env"))
    write_bytes_atomic(fs, f"{path}/x", b"x")
    assert read_bytes(s3.uri("env", "x")) == b"x"


def test_unreachable_endpoint_names_it(s3):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match=f"cannot reach S3 endpoint {endpoint}") as error:
        open_storage(s3.uri("x"), s3_endpoint=endpoint)
    _assert_no_secrets(str(error.value))


def test_missing_bucket(s3):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/x", s3_endpoint=s3.endpoint)


def test_bad_credentials_say_check_credentials_without_printing_them(s3, monkeypatch):
    # moto accepts any key unless IAM checks are on; with them on, our fake key is unknown to
    # its IAM, so every request is refused with 403, as S3 refuses bad credentials.
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(ConfigError, match="check your AWS credentials") as error:
        open_storage(s3.uri("x"), s3_endpoint=s3.endpoint)
    _assert_no_secrets(str(error.value))
    assert error.value.__cause__ is None  # the SDK's text is not chained into tracebacks either


def test_an_endpoint_that_is_not_s3_is_not_called_a_missing_bucket(s3):
    # A plain web server answers HEAD /bucket with a bare 404, as a missing bucket would.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match="does not answer like S3"):
            open_storage(s3.uri("x"), s3_endpoint=endpoint)
    finally:
        server.shutdown()
