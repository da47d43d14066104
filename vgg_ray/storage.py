"""One place that turns a URI (local path, file://, s3://) into a pyarrow filesystem.

Everything that touches shards (prepare, the Ray Data stream, the demo cache) goes through
`open_storage`, so an S3-compatible endpoint, the timeouts and the error messages are set once.
With an explicit filesystem, S3 paths carry no `s3://` prefix: "bucket/prefix/file".

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
~/.aws, instance metadata); this module never reads, logs or repeats them.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vgg_ray.errors import ConfigError

# An outage of a few seconds is retried with the SDK's exponential backoff; an endpoint that
# refuses connections or never answers fails after about max_attempts * connect timeout.
S3_MAX_ATTEMPTS = 4
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0  # per request; a 256 MB shard upload is split into parts
DEFAULT_REGION = "us-east-1"
# The SDK's retries above span about a second; a longer outage (an endpoint restarting, a network
# blip) is waited out by `retry_transient`, up to this many seconds per read, before the read
# fails. VGG_RAY_S3_OUTAGE_LIMIT_S overrides it (in Ray workers: set it before Ray starts).
S3_OUTAGE_LIMIT_S = 300.0
# Words in pyarrow's error text for failures that are the endpoint's, not the request's.
TRANSIENT_S3_ERRORS = ("NETWORK_CONNECTION", "curlCode", "SERVICE_UNAVAILABLE", "SLOW_DOWN",
                       "INTERNAL_FAILURE", "REQUEST_TIMEOUT")  # fmt: skip

Target = str | tuple[pafs.FileSystem, str]
T = TypeVar("T")
log = logging.getLogger("vgg_ray.storage")


class StorageUnreachable(ConfigError):
    """The storage endpoint did not answer (refused, timed out, 5xx): maybe only for now."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def absolute(uri: str) -> str:
    """A local path made absolute where it was typed; URIs (s3://, ...) and "" unchanged. Ray
    Train workers and Tune trials run in working directories of their own, where a relative
    path names nothing."""
    return uri if not uri or "://" in uri else os.path.abspath(os.path.expanduser(uri))


def s3_endpoint_from_env() -> str | None:
    """The endpoint the AWS CLI would use; pyarrow ignores these variables itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def open_storage(uri: str, *, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for `uri`: a local path or file:// URI, or s3://bucket/prefix.

    For S3 the bucket is probed once (one HEAD request) so that an unreachable endpoint, a
    missing bucket or refused credentials surface here as one-line `ConfigError`s.
    `s3_endpoint` ("http://host:port") defaults to AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL,
    then AWS itself.
    """
    if not is_s3(uri):
        path = uri.removeprefix("file://") if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))

    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise ConfigError(f"{uri}: no bucket name (expected s3://bucket/prefix)")
    endpoint = s3_endpoint or s3_endpoint_from_env()
    options: dict = {}
    if endpoint:
        scheme, host = _split_endpoint(endpoint)
        options.update(endpoint_override=host, scheme=scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    fs = pafs.S3FileSystem(
        region=region,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        **options,
    )
    with storage_errors(uri, endpoint):
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            _explain_missing_bucket(fs, uri, bucket, endpoint)
    return fs, f"{bucket}/{prefix}" if prefix else bucket


def _explain_missing_bucket(
    fs: pafs.FileSystem, uri: str, bucket: str, endpoint: str | None
) -> None:
    # HEAD answers 404 without a body, which any web server (or a firewall page) also does;
    # only a listing returns S3's own NoSuchBucket, which tells the two apart.
    try:
        fs.get_file_info(pafs.FileSelector(bucket, allow_not_found=False))
    except OSError as error:
        if "NO_SUCH_BUCKET" in str(error):
            raise ConfigError(f"{uri}: bucket '{bucket}' does not exist") from None
        if "RESOURCE_NOT_FOUND" not in str(error):
            raise  # unreachable, access denied, ...: storage_errors words those
        where = endpoint or "the S3 endpoint"
        raise ConfigError(
            f"{uri}: {where} does not answer like S3 (HTTP 404 without an S3 error); "
            "is the endpoint right?"
        ) from None


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    if "://" not in endpoint:
        endpoint = "https://" + endpoint  # what the AWS CLI assumes for a bare host
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"S3 endpoint '{endpoint}' is not of the form http(s)://host[:port]")
    return parsed.scheme, parsed.netloc


@contextmanager
def storage_errors(uri: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn the storage failures a user can fix into one-line `ConfigError`s.

    pyarrow reports S3 failures as OSError with the SDK's error name in the text; we match on
    that name and write our own message, so nothing from the request (keys, signatures) leaks.
    """
    try:
        yield
    except ConfigError:
        raise
    except FileNotFoundError as error:
        raise ConfigError(f"{uri}: no such file or folder") from error
    except OSError as error:
        text = str(error)
        where = f"S3 endpoint {endpoint}" if endpoint else "S3"
        if "NETWORK_CONNECTION" in text or "curlCode" in text:
            raise StorageUnreachable(
                f"{uri}: cannot reach {where} (is the endpoint right and up?)"
            ) from None
        if "NO_SUCH_BUCKET" in text:
            raise ConfigError(f"{uri}: bucket does not exist") from None
        if re.search(
            r"ACCESS_DENIED|INVALID_ACCESS_KEY|SIGNATURE_DOES_NOT_MATCH|Forbidden|403", text
        ):
            raise ConfigError(
                f"{uri}: access denied by {where}; check your AWS credentials"
            ) from None
        if not is_s3(uri):
            raise ConfigError(f"{uri}: {error.strerror or text}") from error
        raise


def is_transient(error: BaseException) -> bool:
    """Whether `error` is an outage worth waiting out rather than a fault of the request."""
    if isinstance(error, StorageUnreachable):
        return True
    return isinstance(error, OSError) and any(word in str(error) for word in TRANSIENT_S3_ERRORS)


def outage_limit_s() -> float:
    return float(os.environ.get("VGG_RAY_S3_OUTAGE_LIMIT_S", S3_OUTAGE_LIMIT_S))


def retry_transient(call: Callable[[], T], *, what: str) -> T:
    """`call()`, retried with exponential backoff (0.5 s doubling to 30 s) while it fails with
    a transient storage error, for up to `outage_limit_s()`; then a `StorageUnreachable` that
    names `what`. Any other error is raised at once."""
    limit = outage_limit_s()
    deadline, delay, warned = time.monotonic() + limit, 0.5, False
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            if time.monotonic() + delay > deadline:
                # Our words, not the SDK's: its text may carry request details.
                raise StorageUnreachable(f"{what}: storage unreachable for {limit:.0f} s") from None
            if not warned:
                log.warning("%s: storage unreachable, retrying for up to %.0f s", what, limit)
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def _target(target: Target, s3_endpoint: str | None) -> tuple[pafs.FileSystem, str, str]:
    if isinstance(target, str):
        fs, path = open_storage(target, s3_endpoint=s3_endpoint)
        return fs, path, target
    fs, path = target
    return fs, path, path


def read_bytes(target: Target, *, s3_endpoint: str | None = None) -> bytes:
    """The whole object at a URI or at (filesystem, path)."""
    fs, path, name = _target(target, s3_endpoint)
    with storage_errors(name, s3_endpoint), fs.open_input_stream(path) as stream:
        return stream.read()


def exists(target: Target, *, s3_endpoint: str | None = None) -> bool:
    fs, path, name = _target(target, s3_endpoint)
    with storage_errors(name, s3_endpoint):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` so a reader sees either nothing/the old object or all of the new one.

    Local: a temp file in the same folder, then rename. S3: one upload; S3 makes an object
    visible only when its PUT or multipart upload completes, so there is no partial object.
    """
    with storage_errors(path):
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            temp = f"{parent}/.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
            try:
                with fs.open_output_stream(temp) as stream:
                    stream.write(data)
                fs.move(temp, path)  # rename(2): atomic within one file system
            finally:
                if os.path.exists(temp):
                    os.unlink(temp)
        else:
            with fs.open_output_stream(path) as stream:
                stream.write(data)


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended by "/" (for local paths, s3:// URIs and bare paths)."""
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])
