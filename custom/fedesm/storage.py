"""Where a site's private data and checkpoints come from: a local path or an ``s3://`` URI.

Only the site's own process reads its data. S3 objects are fetched with boto3's standard
credential chain (env vars, shared config/profile, instance/role credentials) into a local
cache inside the site's workspace, so the rest of fedesm only ever sees local paths.

Cache layout: ``s3://bucket/some/key`` lands at ``<cache_dir>/bucket/some/key``. Next to the
data, ``<cache_dir>/.fedesm-meta/`` holds one small JSON file per cached object (size, ETag,
LastModified, local mtime) so a second fetch of an unchanged object does not download it again.
Bucket names cannot start with ``.``, so that folder never collides with a bucket.

Endpoint: the ``endpoint_url`` argument, else ``$FEDESM_S3_ENDPOINT_URL``, else boto3's own
handling (``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` / config file). The region comes
from the environment or AWS config as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from fedesm.errors import FedesmError
from fedesm.fileio import atomic_path, atomic_write_text

S3_SCHEME = "s3://"
ENDPOINT_ENV = "FEDESM_S3_ENDPOINT_URL"
META_DIR = ".fedesm-meta"

# Lenient on purpose (legacy buckets may hold upper case or '_'); S3 itself rejects the rest.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "Forbidden"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AuthFailure",
    "UnrecognizedClientException",
}


# --------------------------------------------------------------------------- URIs


def is_s3_uri(uri: str | os.PathLike) -> bool:
    """True for ``s3://...`` strings (case-insensitive scheme); local paths are everything else."""
    return isinstance(uri, str) and uri[:5].lower() == S3_SCHEME


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``.

    The key may be empty (``s3://bucket`` or ``s3://bucket/``) or end with ``/`` (a prefix).
    Keys with ``.``/``..`` segments or empty segments (``a//b``) are refused: they would map to
    a different local path than the object they name, or escape the cache directory.
    """
    if not is_s3_uri(uri):
        raise FedesmError(f"{uri!r} is not an S3 URI (expected s3://bucket/key)")
    rest = uri[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise FedesmError(f"{uri}: malformed S3 URI: missing bucket name (expected s3://bucket/key)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise FedesmError(f"{uri}: malformed S3 URI: invalid bucket name {bucket!r}")
    if "?" in key or "#" in key:
        raise FedesmError(f"{uri}: malformed S3 URI: '?' and '#' are not supported in keys")
    _check_key(uri, key)
    return bucket, key


def _check_key(uri: str, key: str) -> None:
    """Refuse keys that cannot be mirrored safely under the cache directory."""
    segments = key.split("/")
    if segments and segments[-1] == "":
        segments = segments[:-1]  # a trailing '/' marks a prefix
    for seg in segments:
        if seg in (".", ".."):
            raise FedesmError(f"{uri}: refusing key with a '{seg}' path segment (path traversal)")
        if seg == "":
            raise FedesmError(f"{uri}: refusing key with an empty path segment ('//' or leading '/')")
        if "\x00" in seg:
            raise FedesmError(f"{uri}: refusing key with a NUL character")


# --------------------------------------------------------------------------- access policy


class AccessPolicy:
    """The prefixes a site may read from, checked before any read or network call.

    ``allowed_prefixes`` mixes ``s3://bucket[/prefix]`` URIs and local directories. Matching is
    by whole path segment: ``s3://b/data`` allows ``s3://b/data`` and ``s3://b/data/x`` but not
    ``s3://b/database``. Local paths are compared after resolving ``..`` and symlinks, so a path
    that leads outside through either is refused. Relative local prefixes resolve against the
    current directory when the policy is built.

    Fail closed: an empty or ``None`` list allows *nothing*, so a site whose config names no prefixes
    reads no private data at all (the shipped public sets, ``gpsite:ATP``, never go through a
    policy). Every `fetch` and `upload` takes a policy, there is no unchecked call: a site's comes
    from its own config (`fedesm.site_config.SiteConfig.policy`), and a command the user types on
    their own machine passes `AccessPolicy.exactly` of what they typed. ``source`` names the config
    the list came from.
    """

    def __init__(self, allowed_prefixes: Iterable[str | os.PathLike] | None = None, source: str = ""):
        self.allowed_prefixes = [str(p) for p in (allowed_prefixes or [])]
        self.source = source
        self._s3: list[tuple[str, str]] = []
        self._local: list[Path] = []
        for prefix in self.allowed_prefixes:
            if is_s3_uri(prefix):
                bucket, key = parse_s3_uri(prefix)
                self._s3.append((bucket, key.rstrip("/")))
            else:
                if not prefix.strip():
                    raise FedesmError("allowed prefixes: empty entry")
                self._local.append(Path(prefix).expanduser().resolve())

    @classmethod
    def exactly(cls, uri: str | os.PathLike, source: str) -> "AccessPolicy":
        """A policy that allows `uri` (and, for a prefix, what lies under it) and nothing else: for a location
        the user named themselves (`source` says where: a command line, a server's own setting)."""
        return cls([str(uri).rstrip("/") if is_s3_uri(uri) else str(uri)], source=source)

    @property
    def empty(self) -> bool:
        """No prefix listed: every private read is refused."""
        return not self.allowed_prefixes

    def allows(self, uri: str | os.PathLike) -> bool:
        """True when ``uri`` lies under an allowed prefix (malformed S3 URIs raise); never for an empty list."""
        if self.empty:
            return False
        if is_s3_uri(uri):
            bucket, key = parse_s3_uri(str(uri))
            key = key.rstrip("/")
            for allowed_bucket, allowed_key in self._s3:
                if bucket != allowed_bucket:
                    continue
                if not allowed_key or key == allowed_key or key.startswith(allowed_key + "/"):
                    return True
            return False
        path = Path(uri).expanduser().resolve()
        return any(path == root or path.is_relative_to(root) for root in self._local)

    def check(self, uri: str | os.PathLike) -> None:
        """Raise FedesmError when ``uri`` is outside the allowed prefixes."""
        where = f" ({self.source})" if self.source else ""
        if self.empty:
            raise FedesmError(f"{uri}: refused: this site's allowed_prefixes{where} lists nothing, so no private data "
                              "may be read; list the folders or s3:// prefixes of its data and checkpoint")
        if not self.allows(uri):
            raise FedesmError(
                f"{uri} is outside this site's allowed prefixes [{', '.join(self.allowed_prefixes)}]{where}"
            )


# --------------------------------------------------------------------------- S3 client & errors


def make_s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client on the standard credential chain.

    Retries use botocore's "standard" mode (3 attempts) unless the environment configures
    retries itself, so an unreachable endpoint fails in seconds rather than a minute.
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    config_kwargs = {}
    if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
        config_kwargs["retries"] = {"mode": "standard"}
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, config=Config(**config_kwargs))


def _s3_error(uri: str, exc: BaseException) -> FedesmError:
    """Translate a botocore exception (possibly wrapped by boto3's transfer layer) into one line."""
    from botocore import exceptions as bce

    # boto3 wraps transfer failures: S3UploadFailedError (cause: ClientError), RetriesExceededError.
    botocore_errors = (bce.BotoCoreError, bce.ClientError)
    if not isinstance(exc, botocore_errors):
        for inner in (getattr(exc, "last_exception", None), exc.__cause__, exc.__context__):
            if isinstance(inner, botocore_errors):
                exc = inner
                break
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return FedesmError(f"could not authenticate to S3 for {uri} (no usable credentials found): check AWS credentials")
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        bucket = parse_s3_uri(uri)[0]
        if code in _NO_BUCKET:
            return FedesmError(f"{uri}: no such bucket {bucket!r}")
        if code in _NOT_FOUND:
            return FedesmError(f"{uri}: no such object")
        if code in _BAD_CREDENTIALS:
            return FedesmError(f"could not authenticate to S3 for {uri} ({code}): check AWS credentials")
        if code in _DENIED:
            return FedesmError(f"{uri}: access denied by S3 (check this site's IAM permissions for the bucket/prefix)")
        message = " ".join(str(err.get("Message", "")).split())
        return FedesmError(f"{uri}: S3 error {code}: {message}".rstrip(": "))
    if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionClosedError)):
        return FedesmError(f"{uri}: cannot reach the S3 endpoint ({' '.join(str(exc).split())})")
    if isinstance(exc, bce.BotoCoreError):
        return FedesmError(f"{uri}: S3 error: {' '.join(str(exc).split())}")
    return FedesmError(f"{uri}: {' '.join(str(exc).split())}")


def _head(client, uri: str, bucket: str, key: str) -> dict:
    """HeadObject, with a precise error: HEAD responses carry no error code in their body
    (only 403/404), so on failure a 1-byte GET asks S3 what exactly is wrong."""
    from botocore import exceptions as bce

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except bce.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if not code.isdigit():
            raise _s3_error(uri, exc) from None
        try:
            client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
        except bce.ClientError as probe:
            raise _s3_error(uri, probe) from None
        except Exception:
            pass
        raise _s3_error(uri, exc) from None
    except bce.BotoCoreError as exc:
        raise _s3_error(uri, exc) from None


# --------------------------------------------------------------------------- cache


def _cache_target(cache_dir: Path, bucket: str, key: str, uri: str) -> Path:
    """``cache_dir/bucket/key``, refusing anything that would land outside ``cache_dir``."""
    _check_key(uri, key)
    root = cache_dir.resolve()
    target = root / bucket / key
    resolved = target.resolve()
    if not resolved.is_relative_to(root / bucket):
        raise FedesmError(f"{uri}: refusing to write outside the cache directory {cache_dir}")
    return target


def _meta_path(cache_dir: Path, bucket: str, key: str) -> Path:
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
    return cache_dir.resolve() / META_DIR / f"{digest}.json"


def _object_info(size: int, etag: str, last_modified) -> dict:
    # LastModified is compared at whole seconds: HEAD (HTTP date) and LIST (ISO) differ in precision.
    return {"size": int(size), "etag": str(etag), "last_modified": int(last_modified.timestamp())}


def _is_fresh(target: Path, meta_path: Path, info: dict) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (
        target.is_file()
        and st.st_size == info["size"]
        and meta.get("size") == info["size"]
        and meta.get("etag") == info["etag"]
        and meta.get("last_modified") == info["last_modified"]
        and meta.get("mtime_ns") == st.st_mtime_ns
    )


def _download(client, uri: str, bucket: str, key: str, target: Path, meta_path: Path, info: dict) -> None:
    """Download to a temp file next to ``target``, check its size, then rename into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, suffix=".part") as tmp:
            # s3transfer pins the download to one ETag (IfMatch) and uses ranged parallel GETs for big files.
            client.download_file(bucket, key, str(tmp))
            size = os.path.getsize(tmp)
            if size != info["size"]:
                raise FedesmError(f"{uri}: downloaded {size} bytes, expected {info['size']} (object changed? retry)")
    except FedesmError:
        raise
    except OSError as exc:
        raise FedesmError(f"{uri}: cannot write {target}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise _s3_error(uri, exc) from None
    meta = dict(info, uri=uri, mtime_ns=target.stat().st_mtime_ns)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_path, json.dumps(meta, sort_keys=True))


def _fetch_object(client, uri: str, bucket: str, key: str, cache_dir: Path, info: dict | None = None) -> Path:
    target = _cache_target(cache_dir, bucket, key, uri)
    if info is None:
        head = _head(client, uri, bucket, key)
        info = _object_info(head["ContentLength"], head["ETag"], head["LastModified"])
    meta_path = _meta_path(cache_dir, bucket, key)
    if not _is_fresh(target, meta_path, info):
        _download(client, uri, bucket, key, target, meta_path, info)
    return target


def _fetch_prefix(client, uri: str, bucket: str, prefix: str, cache_dir: Path) -> Path:
    """Mirror every object under ``prefix`` and drop cached files no longer in the listing,
    so a stale shard can never leak into a dataset directory."""
    from botocore import exceptions as bce

    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # skip "folder" marker objects
                    objects.append(obj)
    except (bce.BotoCoreError, bce.ClientError) as exc:
        raise _s3_error(uri, exc) from None
    if not objects:
        raise FedesmError(f"{uri}: no objects under this prefix")

    root = _cache_target(cache_dir, bucket, prefix, uri) if prefix else cache_dir.resolve() / bucket
    wanted = set()
    for obj in objects:
        key = obj["Key"]
        object_uri = f"{S3_SCHEME}{bucket}/{key}"
        info = _object_info(obj["Size"], obj["ETag"], obj["LastModified"])
        wanted.add(_fetch_object(client, object_uri, bucket, key, cache_dir, info))
    bucket_dir = cache_dir.resolve() / bucket
    for path in sorted(root.rglob("*")):
        if path.is_file() and path not in wanted and not path.name.endswith(".part"):
            path.unlink()
            _meta_path(cache_dir, bucket, path.relative_to(bucket_dir).as_posix()).unlink(missing_ok=True)
    return root


# --------------------------------------------------------------------------- public API


def _require(policy) -> "AccessPolicy":
    if not isinstance(policy, AccessPolicy):
        raise FedesmError("storage: every read and upload needs the site's own allow-list (an AccessPolicy), "
                          f"got {type(policy).__name__}")
    return policy


def fetch(
    uri: str | os.PathLike,
    cache_dir: str | os.PathLike,
    policy: AccessPolicy,
    endpoint_url: str | None = None,
) -> Path:
    """Return a local path holding ``uri``'s content, checked against ``policy`` (required) first.

    - local path: must exist; returned as given (``~`` expanded), nothing is copied.
    - ``s3://bucket/key``: downloaded to ``cache_dir/bucket/key`` (reused when unchanged).
    - ``s3://bucket/prefix/`` (trailing ``/``): every object under the prefix is mirrored into
      ``cache_dir/bucket/prefix/``; that directory is returned.
    - a shipped public set's name (``gpsite:ATP``, `fedesm.data.catalog`): its file, policy not applied.
    """
    from fedesm.data.catalog import is_shipped_name, resolve

    _require(policy)
    if is_shipped_name(uri):
        return Path(resolve(str(uri)))
    policy.check(uri)
    if not is_s3_uri(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FedesmError(f"{uri}: no such file or directory")
        return path

    uri = str(uri)
    bucket, key = parse_s3_uri(uri)
    if not key and not uri.endswith("/"):
        raise FedesmError(f"{uri}: names a bucket, not an object (add a trailing '/' to fetch the whole bucket)")
    cache_dir = Path(cache_dir).expanduser()
    client = make_s3_client(endpoint_url)
    if not key or key.endswith("/"):
        return _fetch_prefix(client, uri, bucket, key, cache_dir)
    return _fetch_object(client, uri, bucket, key, cache_dir)


def upload(
    local_path: str | os.PathLike,
    uri: str,
    endpoint_url: str | None = None,
    *,
    policy: AccessPolicy,
) -> list[str]:
    """Upload a file (to ``uri``, or ``uri + name`` when ``uri`` ends with ``/``) or a directory
    (recursively, under the ``uri`` prefix, which must end with ``/``). Returns the URIs written.
    Both the file read and every object written must lie under ``policy`` (required).

    S3 makes each object visible only once fully uploaded, so readers never see partial files.
    """
    _require(policy)
    local = Path(local_path).expanduser()
    policy.check(local)
    bucket, key = parse_s3_uri(uri)
    if local.is_dir():
        if key and not key.endswith("/"):
            raise FedesmError(f"{uri}: uploading a directory needs a prefix URI ending with '/'")
        pairs = [(p, key + p.relative_to(local).as_posix()) for p in sorted(local.rglob("*")) if p.is_file()]
    elif local.is_file():
        pairs = [(local, key + local.name if (not key or key.endswith("/")) else key)]
    else:
        raise FedesmError(f"{local_path}: no such file or directory")

    written = []
    client = None
    for path, object_key in pairs:
        object_uri = f"{S3_SCHEME}{bucket}/{object_key}"
        parse_s3_uri(object_uri)  # refuse keys we could not fetch back safely
        policy.check(object_uri)
        client = client or make_s3_client(endpoint_url)
        try:
            client.upload_file(str(path), bucket, object_key)
        except OSError as exc:
            raise FedesmError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except Exception as exc:
            raise _s3_error(object_uri, exc) from None
        written.append(object_uri)
    return written
