"""fedesm.storage against a real S3 HTTP API (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import pytest
from boto3.exceptions import RetriesExceededError
from botocore.exceptions import ReadTimeoutError

from fedesm import storage
from fedesm.errors import FedesmError
from fedesm.storage import AccessPolicy, fetch, is_s3_uri, parse_s3_uri, upload
from tests.s3_server import free_port, point_env_at, s3, s3_server  # noqa: F401 (fixtures)

BUCKET = "site-a-data"
FASTA = ">P1 binding=0010\nMKTA\n>P2\n"  # 3 lines


def own(tmp_path) -> AccessPolicy:
    """What the tests' own commands may touch (every fetch and upload needs an allow-list)."""
    return AccessPolicy([f"s3://{BUCKET}", "s3://no-such-bucket", "s3://missing-bucket", "s3://bkt", tmp_path],
                        source="the test")


def _client(server):
    return boto3.client("s3", endpoint_url=server.endpoint_url)


@pytest.fixture
def bucket(s3):
    _client(s3).create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture
def calls(monkeypatch):
    """Counts S3 operations made by fedesm.storage (by operation name)."""
    counts: dict[str, int] = {}
    real = storage.make_s3_client

    def counting_client(endpoint_url=None):
        client = real(endpoint_url)

        def count(model, **_):
            counts[model.name] = counts.get(model.name, 0) + 1

        client.meta.events.register("before-call.s3", count)
        return client

    monkeypatch.setattr(storage, "make_s3_client", counting_client)
    return counts


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to build an S3 client fails the test; the endpoint is a closed port anyway."""
    monkeypatch.setenv("FEDESM_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")

    def refuse(endpoint_url=None):
        raise AssertionError("storage tried to reach S3")

    monkeypatch.setattr(storage, "make_s3_client", refuse)


def _put(server, key: str, body: bytes) -> None:
    _client(server).put_object(Bucket=BUCKET, Key=key, Body=body)


# ----------------------------------------------------------------------------- URIs


def test_is_s3_uri():
    assert is_s3_uri("s3://b/k") and is_s3_uri("S3://b/k")
    assert not is_s3_uri("/data/s3://x") and not is_s3_uri("data.fasta") and not is_s3_uri(Path("s3:/x"))


def test_parse_s3_uri():
    assert parse_s3_uri("s3://my-bucket/a/b.fasta") == ("my-bucket", "a/b.fasta")
    assert parse_s3_uri("s3://my-bucket/a/") == ("my-bucket", "a/")
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://", "missing bucket"),
        ("s3:///key", "missing bucket"),
        ("s3://bad bucket/k", "invalid bucket name"),
        ("s3://b/k", "invalid bucket name"),
        ("s3://a..b/k", "invalid bucket name"),
        ("s3://bkt/../x", "path traversal"),
        ("s3://bkt/a/../../x", "path traversal"),
        ("s3://bkt/./x", "path traversal"),
        ("s3://bkt/a//b", "empty path segment"),
        ("s3://bkt//a", "empty path segment"),
        ("s3://bkt/a?versionId=1", "not supported"),
        ("https://bkt/a", "not an S3 URI"),
    ],
)
def test_parse_s3_uri_rejects_malformed(uri, message):
    with pytest.raises(FedesmError, match=message) as err:
        parse_s3_uri(uri)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- access policy


def test_policy_s3_matches_whole_segments():
    policy = AccessPolicy(["s3://bkt/data", "s3://other-bucket"])
    assert policy.allows("s3://bkt/data") and policy.allows("s3://bkt/data/") and policy.allows("s3://bkt/data/x/y")
    assert policy.allows("s3://other-bucket/anything")
    assert not policy.allows("s3://bkt/database/x")
    assert not policy.allows("s3://bkt/x")
    assert not policy.allows("s3://bkt2/data/x")
    assert not policy.allows("/bkt/data/x")  # a local path never matches an S3 prefix
    with pytest.raises(FedesmError, match=r"s3://bkt/x is outside this site's allowed prefixes \[s3://bkt/data, s3://other-bucket\]"):
        policy.check("s3://bkt/x")


def test_policy_local_resolves_dotdot_and_symlinks(tmp_path):
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.fasta").write_text(FASTA)
    (site / "data" / "link").symlink_to(tmp_path / "secret")
    policy = AccessPolicy([str(site)])
    assert policy.allows(site / "data" / "a.fasta") and policy.allows(site)
    assert not policy.allows(site / ".." / "secret" / "x.fasta")
    assert not policy.allows(site / "data" / "link" / "x.fasta")
    assert not policy.allows(str(tmp_path / "site2"))  # sibling with a common string prefix
    assert not policy.allows("s3://site/x")


def test_empty_policy_refuses_every_private_read_but_not_shipped_sets(tmp_path, no_network):
    """Fail closed: no listed prefix means no private read at all (a site that forgot the key reads
    nothing), before any file or network access; the shipped public sets stay readable."""
    data = tmp_path / "train.fasta"
    data.write_text(FASTA)
    for policy in (AccessPolicy([], source="site.yaml"), AccessPolicy(None)):
        assert policy.empty
        for uri in ("s3://anything/at/all", str(data), tmp_path / ".." / "x"):
            assert not policy.allows(uri)
        with pytest.raises(FedesmError, match=r"train.fasta: refused: this site's allowed_prefixes .*lists nothing"):
            fetch(str(data), tmp_path / "cache", policy=policy)
        with pytest.raises(FedesmError, match="lists nothing"):
            fetch("s3://bkt/data/train.fa", tmp_path / "cache", policy=policy)  # refused before any S3 call
        assert fetch("gpsite:ATP:test", tmp_path / "cache", policy=policy).name == "ATP_test.txt.gz"
    assert "(site.yaml)" in _message(lambda: AccessPolicy([], source="site.yaml").check(str(data)))
    assert fetch(str(data), tmp_path / "cache", policy=AccessPolicy.exactly(data, "a command line")) == data
    for call in (lambda: fetch(str(data), tmp_path / "cache", None), lambda: fetch("gpsite:ATP:test", tmp_path, None),
                 lambda: upload(data, "s3://bkt/x", policy=None)):  # no unchecked read or upload, not even a public set
        with pytest.raises(FedesmError, match="needs the site's own allow-list"):
            call()
    with pytest.raises(TypeError):
        fetch(str(data), tmp_path / "cache")  # the allow-list is a required argument


def _message(call) -> str:
    with pytest.raises(FedesmError) as err:
        call()
    return str(err.value)


def test_policy_rejects_malformed_prefix():
    with pytest.raises(FedesmError, match="path traversal"):
        AccessPolicy(["s3://bkt/../other"])


# ----------------------------------------------------------------------------- local paths


def test_fetch_local_path_checked_and_returned(tmp_path, no_network):
    data = tmp_path / "site" / "train.fasta"
    data.parent.mkdir()
    data.write_text(FASTA)
    cache = tmp_path / "cache"
    assert fetch(str(data), cache, policy=own(tmp_path)) == data
    assert fetch(data, cache, policy=AccessPolicy([tmp_path / "site"])) == data
    assert not cache.exists()
    with pytest.raises(FedesmError, match=r"missing\.fasta: no such file or directory"):
        fetch(str(tmp_path / "site" / "missing.fasta"), cache, policy=own(tmp_path))


def test_fetch_local_dotdot_escape_is_denied(tmp_path, no_network):
    (tmp_path / "site").mkdir()
    (tmp_path / "private.fasta").write_text(FASTA)
    escape = str(tmp_path / "site" / ".." / "private.fasta")
    with pytest.raises(FedesmError, match="outside this site's allowed prefixes"):
        fetch(escape, tmp_path / "cache", policy=AccessPolicy([tmp_path / "site"]))


# ----------------------------------------------------------------------------- S3 reads


def test_fetch_fasta_dataset(bucket, tmp_path):
    _put(bucket, "train/train.fasta", FASTA.encode())
    cache = tmp_path / "cache"
    path = fetch(f"s3://{BUCKET}/train/train.fasta", cache, policy=own(tmp_path))
    assert path == cache.resolve() / BUCKET / "train" / "train.fasta"
    assert path.read_text() == FASTA and len(path.read_text().splitlines()) == 3
    assert not list(path.parent.glob("*.part"))


def test_fetch_binary_checkpoint_multipart(bucket, tmp_path):
    # 9 MiB: above s3transfer's 8 MiB threshold, so the download uses ranged, ETag-pinned GETs.
    blob = os.urandom(9 * 1024 * 1024)
    _put(bucket, "models/esm2_t6_8M.pt", blob)
    path = fetch(f"s3://{BUCKET}/models/esm2_t6_8M.pt", tmp_path / "cache", endpoint_url=bucket.endpoint_url, policy=own(tmp_path))
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(blob).digest()


def test_second_fetch_reuses_cache_without_get(bucket, tmp_path, calls):
    _put(bucket, "models/ckpt.pt", b"\x00\x01weights" * 100)
    uri = f"s3://{BUCKET}/models/ckpt.pt"
    cache = tmp_path / "cache"

    first = fetch(uri, cache, policy=own(tmp_path))
    assert calls.get("GetObject", 0) >= 1
    st = first.stat()
    calls.clear()

    second = fetch(uri, cache, policy=own(tmp_path))
    assert second == first
    assert calls == {"HeadObject": 1}  # one metadata request, no download
    assert (second.stat().st_ino, second.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    # The object changes in S3: the next fetch downloads the new content.
    _put(bucket, "models/ckpt.pt", b"new weights")
    calls.clear()
    assert fetch(uri, cache, policy=own(tmp_path)).read_bytes() == b"new weights"
    assert calls.get("GetObject", 0) >= 1

    # The cached copy is edited locally: it is replaced by the object's content.
    first.write_bytes(b"tampered!!!")  # same size as the object
    assert fetch(uri, cache, policy=own(tmp_path)).read_bytes() == b"new weights"


def test_fetch_prefix_mirrors_keys_and_drops_stale_files(bucket, tmp_path, calls):
    _put(bucket, "data/train.fasta", FASTA.encode())
    _put(bucket, "data/splits/valid.fasta", b">P9\nAAA\n")
    _put(bucket, "data/", b"")  # a console-made "folder" marker object
    _put(bucket, "other/private.fasta", b">X\nA\n")
    cache = tmp_path / "cache"

    root = fetch(f"s3://{BUCKET}/data/", cache, policy=own(tmp_path))
    assert root == cache.resolve() / BUCKET / "data"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["splits/valid.fasta", "train.fasta"]
    assert (root / "train.fasta").read_text() == FASTA
    assert not (cache / BUCKET / "other").exists()

    calls.clear()
    assert fetch(f"s3://{BUCKET}/data/", cache, policy=own(tmp_path)) == root
    assert "GetObject" not in calls  # everything reused from the cache

    _client(bucket).delete_object(Bucket=BUCKET, Key="data/splits/valid.fasta")
    fetch(f"s3://{BUCKET}/data/", cache, policy=own(tmp_path))
    assert not (root / "splits" / "valid.fasta").exists()
    assert (root / "train.fasta").exists()
    assert len(list((cache / storage.META_DIR).glob("*.json"))) == 1  # its cache record went too


def test_fetch_whole_bucket_needs_trailing_slash(bucket, tmp_path):
    _put(bucket, "a.fasta", FASTA.encode())
    with pytest.raises(FedesmError, match="names a bucket, not an object"):
        fetch(f"s3://{BUCKET}", tmp_path / "cache", policy=own(tmp_path))
    root = fetch(f"s3://{BUCKET}/", tmp_path / "cache", policy=own(tmp_path))
    assert (root / "a.fasta").read_text() == FASTA


def test_empty_prefix_is_an_error(bucket, tmp_path):
    with pytest.raises(FedesmError, match=rf"^s3://{BUCKET}/nothing/: no objects under this prefix$"):
        fetch(f"s3://{BUCKET}/nothing/", tmp_path / "cache", policy=own(tmp_path))


def test_listed_key_with_dotdot_never_escapes_cache(bucket, tmp_path):
    _put(bucket, "data/ok.fasta", FASTA.encode())
    _put(bucket, "data/../../../evil.txt", b"pwned")  # S3 accepts any key
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(FedesmError, match="path traversal"):
        fetch(f"s3://{BUCKET}/data/", cache, policy=own(tmp_path))
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- S3 errors


def test_missing_object(bucket, tmp_path):
    with pytest.raises(FedesmError, match=rf"^s3://{BUCKET}/nope\.fasta: no such object$"):
        fetch(f"s3://{BUCKET}/nope.fasta", tmp_path / "cache", policy=own(tmp_path))
    assert not (tmp_path / "cache" / BUCKET / "nope.fasta").exists()


def test_missing_bucket(s3, tmp_path):
    with pytest.raises(FedesmError, match=r"^s3://no-such-bucket/x\.fasta: no such bucket 'no-such-bucket'$"):
        fetch("s3://no-such-bucket/x.fasta", tmp_path / "cache", policy=own(tmp_path))
    with pytest.raises(FedesmError, match="no such bucket 'no-such-bucket'"):
        fetch("s3://no-such-bucket/data/", tmp_path / "cache", policy=own(tmp_path))


def test_denied_prefix_refused_before_any_network_call(tmp_path, no_network):
    policy = AccessPolicy([f"s3://{BUCKET}/site-a/"])
    with pytest.raises(FedesmError, match=rf"s3://{BUCKET}/site-b/train\.fasta is outside this site's allowed prefixes \[s3://{BUCKET}/site-a/\]"):
        fetch(f"s3://{BUCKET}/site-b/train.fasta", tmp_path / "cache", policy=policy)
    with pytest.raises(FedesmError, match="outside this site's allowed prefixes"):
        fetch(f"s3://{BUCKET}/site-a-evil/x", tmp_path / "cache", policy=policy)
    with pytest.raises(FedesmError, match="path traversal"):
        fetch(f"s3://{BUCKET}/site-a/../site-b/x", tmp_path / "cache", policy=policy)
    with pytest.raises(FedesmError, match="path traversal"):
        fetch(f"s3://{BUCKET}/../x", tmp_path / "cache", policy=own(tmp_path))
    assert not (tmp_path / "cache").exists()


def test_allowed_prefix_reads(bucket, tmp_path):
    _put(bucket, "site-a/train.fasta", FASTA.encode())
    policy = AccessPolicy([f"s3://{BUCKET}/site-a"])
    assert fetch(f"s3://{BUCKET}/site-a/train.fasta", tmp_path / "c", policy=policy).read_text() == FASTA


def test_unknown_access_key_is_an_authentication_error(bucket, tmp_path):
    _put(bucket, "train.fasta", FASTA.encode())
    bucket.set_auth(True)  # moto now checks keys against its IAM: "testing" does not exist
    with pytest.raises(FedesmError, match=r"^could not authenticate to S3 for .*\(InvalidAccessKeyId\): check AWS credentials$"):
        fetch(f"s3://{BUCKET}/train.fasta", tmp_path / "cache", policy=own(tmp_path))
    with pytest.raises(FedesmError, match=r"could not authenticate to S3 .*check AWS credentials"):
        fetch(f"s3://{BUCKET}/", tmp_path / "cache", policy=own(tmp_path))
    assert not (tmp_path / "cache" / BUCKET / "train.fasta").exists()


def test_wrong_secret_is_an_authentication_error(bucket, tmp_path, monkeypatch):
    _put(bucket, "train.fasta", FASTA.encode())
    iam = boto3.client("iam", endpoint_url=bucket.endpoint_url)
    iam.create_user(UserName="site-a")
    key = iam.create_access_key(UserName="site-a")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + key["SecretAccessKey"])
    bucket.set_auth(True)
    with pytest.raises(FedesmError, match=r"\(SignatureDoesNotMatch\): check AWS credentials"):
        fetch(f"s3://{BUCKET}/train.fasta", tmp_path / "cache", policy=own(tmp_path))


def test_access_denied_by_iam_policy(bucket, tmp_path, monkeypatch):
    _put(bucket, "site-a/train.fasta", FASTA.encode())
    _put(bucket, "site-b/train.fasta", FASTA.encode())
    iam = boto3.client("iam", endpoint_url=bucket.endpoint_url)
    iam.create_user(UserName="site-a")
    iam.put_user_policy(
        UserName="site-a",
        PolicyName="read-own-prefix",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/site-a/*"}
                ],
            }
        ),
    )
    key = iam.create_access_key(UserName="site-a")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    bucket.set_auth(True)

    assert fetch(f"s3://{BUCKET}/site-a/train.fasta", tmp_path / "cache", policy=own(tmp_path)).read_text() == FASTA
    with pytest.raises(FedesmError, match=rf"^s3://{BUCKET}/site-b/train\.fasta: access denied by S3"):
        fetch(f"s3://{BUCKET}/site-b/train.fasta", tmp_path / "cache", policy=own(tmp_path))


def test_no_credentials(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(FedesmError, match=r"^could not authenticate to S3 for s3://bkt/x \(no usable credentials found\): check AWS credentials$"):
        fetch("s3://bkt/x", tmp_path / "cache", policy=own(tmp_path))


def test_unreachable_endpoint(tmp_path, monkeypatch):
    point_env_at(monkeypatch, type("Closed", (), {"endpoint_url": f"http://127.0.0.1:{free_port()}"})(), tmp_path)
    with pytest.raises(FedesmError, match=r"^s3://bkt/x\.pt: cannot reach the S3 endpoint \(Could not connect to the endpoint URL"):
        fetch("s3://bkt/x.pt", tmp_path / "cache", policy=own(tmp_path))


def test_an_unreachable_endpoint_is_tried_three_times_only(tmp_path, monkeypatch):
    """Why it fails in seconds, counted rather than timed (a loaded machine makes any wall-clock bound flaky):
    botocore's standard retry mode, 3 attempts in all, unless the environment configures retries itself."""
    from botocore.exceptions import EndpointConnectionError

    point_env_at(monkeypatch, type("Closed", (), {"endpoint_url": f"http://127.0.0.1:{free_port()}"})(), tmp_path)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    client = storage.make_s3_client()
    attempts = []
    client.meta.events.register("before-send.s3.HeadObject", lambda **kw: attempts.append(1))
    with pytest.raises(EndpointConnectionError):
        client.head_object(Bucket="bkt", Key="x.pt")
    assert len(attempts) == 3


def test_endpoint_argument_and_env_precedence(bucket, tmp_path, monkeypatch):
    _put(bucket, "a.fasta", FASTA.encode())
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FEDESM_S3_ENDPOINT_URL", closed)
    # The argument wins over the environment.
    assert fetch(f"s3://{BUCKET}/a.fasta", tmp_path / "c1", endpoint_url=bucket.endpoint_url, policy=own(tmp_path)).read_text() == FASTA
    # Without FEDESM_S3_ENDPOINT_URL, boto3's own AWS_ENDPOINT_URL_S3 is honoured.
    monkeypatch.delenv("FEDESM_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", bucket.endpoint_url)
    assert fetch(f"s3://{BUCKET}/a.fasta", tmp_path / "c2", policy=own(tmp_path)).read_text() == FASTA


def test_failed_download_leaves_no_partial_file(bucket, tmp_path, monkeypatch):
    _put(bucket, "big.pt", b"x" * 1000)
    real = storage.make_s3_client

    def failing_client(endpoint_url=None):
        client = real(endpoint_url)

        def half_then_fail(bucket_name, key, filename, **kwargs):
            Path(filename).write_bytes(b"x" * 500)
            raise RetriesExceededError(ReadTimeoutError(endpoint_url=bucket.endpoint_url))

        client.download_file = half_then_fail
        return client

    monkeypatch.setattr(storage, "make_s3_client", failing_client)
    with pytest.raises(FedesmError, match=rf"^s3://{BUCKET}/big\.pt: S3 error: Read timeout on endpoint URL"):
        fetch(f"s3://{BUCKET}/big.pt", tmp_path / "cache", policy=own(tmp_path))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------- upload


def test_upload_file_and_directory_round_trip(bucket, tmp_path):
    results = tmp_path / "results"
    (results / "round_1").mkdir(parents=True)
    (results / "metrics.json").write_text('{"auprc": 0.5}')
    (results / "round_1" / "adapter.safetensors").write_bytes(b"\x01\x02")

    assert upload(results / "metrics.json", f"s3://{BUCKET}/out/", policy=own(tmp_path)) == [f"s3://{BUCKET}/out/metrics.json"]
    assert upload(results / "metrics.json", f"s3://{BUCKET}/out/m.json", policy=own(tmp_path)) == [f"s3://{BUCKET}/out/m.json"]
    assert upload(results, f"s3://{BUCKET}/run1/", policy=own(tmp_path)) == [
        f"s3://{BUCKET}/run1/metrics.json",
        f"s3://{BUCKET}/run1/round_1/adapter.safetensors",
    ]
    root = fetch(f"s3://{BUCKET}/run1/", tmp_path / "cache", policy=own(tmp_path))
    assert (root / "round_1" / "adapter.safetensors").read_bytes() == b"\x01\x02"
    assert fetch(f"s3://{BUCKET}/out/m.json", tmp_path / "cache", policy=own(tmp_path)).read_text() == '{"auprc": 0.5}'


def test_upload_errors(bucket, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FedesmError, match="no such file or directory"):
        upload(tmp_path / "missing.txt", f"s3://{BUCKET}/x", policy=own(tmp_path))
    with pytest.raises(FedesmError, match="needs a prefix URI ending with '/'"):
        upload(tmp_path / "d", f"s3://{BUCKET}/x", policy=own(tmp_path))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FedesmError, match="no such bucket 'missing-bucket'"):
        upload(tmp_path / "f.txt", "s3://missing-bucket/f.txt", policy=own(tmp_path))
    with pytest.raises(FedesmError, match="outside this site's allowed prefixes"):
        upload(tmp_path / "f.txt", f"s3://{BUCKET}/other/f.txt", policy=AccessPolicy([f"s3://{BUCKET}/results"]))


def test_upload_reads_and_writes_only_inside_the_allow_list(bucket, tmp_path):
    """The attack the former optional policy allowed: the site's private training file to another bucket.
    With the site's own allow-list (its data and results prefix) nothing is read or written elsewhere."""
    client = _client(bucket)
    client.create_bucket(Bucket="attacker-drop")
    data = tmp_path / "site" / "train.fasta"
    data.parent.mkdir()
    data.write_text(FASTA)
    site = AccessPolicy([tmp_path / "site", f"s3://{BUCKET}/results"], source="site.yaml")
    with pytest.raises(FedesmError, match=r"s3://attacker-drop/train.fasta is outside this site's allowed prefixes"):
        upload(data, "s3://attacker-drop/", policy=site)
    key = tmp_path / "startup" / "client.key"
    key.parent.mkdir()
    key.write_text("-----BEGIN PRIVATE KEY-----")
    with pytest.raises(FedesmError, match=r"client.key is outside this site's allowed prefixes"):
        upload(key, f"s3://{BUCKET}/results/", policy=site)  # a file outside the list is not read either
    assert "Contents" not in client.list_objects_v2(Bucket="attacker-drop")
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET)
    assert upload(data, f"s3://{BUCKET}/results/", policy=site) == [f"s3://{BUCKET}/results/train.fasta"]
