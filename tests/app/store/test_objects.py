"""``app.store.objects``: DATA_DIR itself by default; an S3 bucket (moto's S3 API
server on loopback, reached through the standard ``AWS_*`` variables) with
DATA_DIR as each process's cache. Objects are checked with boto3, not with the
code under test."""

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from app.store.objects import ObjectStore, StorageError
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    S3_CREDENTIALS,
    bucket_keys,
    fake_client,
    new_bucket,
    s3_server,
    upload_dataset,
)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    with s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    return new_bucket(s3_endpoint, monkeypatch)


def write_dataset(root, key: str) -> dict[str, bytes]:
    files = {
        "annotations.json": b'{"images": []}',
        "images/a.png": b"\x89PNG first",
        "images/nested/b.png": b"\x89PNG second",
    }
    for name, data in files.items():
        path = root / key / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_the_default_store_is_data_dir_itself(tmp_path):
    store = ObjectStore("", tmp_path / "data")
    assert not store.remote and store.url == str(tmp_path / "data")
    files = write_dataset(store.cache, "datasets/ds-1")
    store.put("datasets/ds-1")  # nothing to copy
    assert store.fetch_folder("datasets/ds-1") == tmp_path / "data" / "datasets" / "ds-1"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["datasets"]
    with pytest.raises(FileNotFoundError, match="ds-2"):
        store.fetch_folder("datasets/ds-2")
    with pytest.raises(FileNotFoundError):
        store.fetch_file("models/model-1.safetensors")
    store.delete("datasets/ds-1", folder=True)
    assert not (store.cache / "datasets" / "ds-1").exists() and files
    # the same folder by another spelling is still not a second copy
    assert not ObjectStore(f"file://{tmp_path}/data/", tmp_path / "data").remote


def test_a_folder_elsewhere_is_a_store_too(tmp_path):
    """``file://`` (a mounted filesystem, say): copied there and back like a bucket."""
    writer = ObjectStore(f"file://{tmp_path}/store", tmp_path / "writer")
    assert writer.remote
    files = write_dataset(writer.cache, "datasets/ds-1")
    writer.put("datasets/ds-1")
    assert (tmp_path / "store" / "datasets" / "ds-1" / "images" / "nested" / "b.png").is_file()
    folder = ObjectStore(f"file://{tmp_path}/store", tmp_path / "reader").fetch_folder(
        "datasets/ds-1"
    )
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.*")} == files


def test_processes_that_fetch_one_key_at_once_fetch_it_once(bucket, tmp_path, caplog):
    """The ranks of one training job share a cache: one copy, fetched once."""
    write_dataset(tmp_path / "writer", "datasets/ds-1")
    ObjectStore(bucket, tmp_path / "writer").put("datasets/ds-1")
    stores = [ObjectStore(bucket, tmp_path / "shared") for _ in range(4)]
    with caplog.at_level(logging.INFO, logger="app.store.objects"), ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda s: s.fetch_folder("datasets/ds-1"), stores))
    assert len(set(folders)) == 1 and len(list(folders[0].rglob("*.*"))) == 3
    assert caplog.text.count("fetched datasets/ds-1 from the object store (3 files)") == 1
    assert [p.suffix for p in (tmp_path / "shared" / "tmp").iterdir()] == [".lock"]


def test_a_bucket_holds_each_object_whole_and_another_cache_fetches_it(bucket, tmp_path):
    writer = ObjectStore(bucket, tmp_path / "writer")
    reader = ObjectStore(bucket, tmp_path / "reader")
    assert writer.remote
    files = write_dataset(writer.cache, "datasets/ds-1")
    (writer.cache / "models").mkdir()
    (writer.cache / "models" / "model-1.safetensors").write_bytes(b"weights")
    writer.put("datasets/ds-1")
    writer.put("models/model-1.safetensors")
    assert bucket_keys(bucket) == sorted(
        [*(f"datasets/ds-1/{name}" for name in files), "models/model-1.safetensors"]
    )

    folder = reader.fetch_folder("datasets/ds-1")
    assert folder == tmp_path / "reader" / "datasets" / "ds-1"
    fetched = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.*")}
    assert fetched == files
    assert reader.fetch_file("models/model-1.safetensors").read_bytes() == b"weights"
    staged = [p for p in (tmp_path / "reader" / "tmp").iterdir() if p.suffix != ".lock"]
    assert not staged  # fetched into tmp/, then renamed into place

    # fetched once: the cache answers even when the store no longer has it
    bucket_name, prefix = bucket.removeprefix("s3://").split("/", 1)
    boto3.client("s3").delete_object(Bucket=bucket_name, Key=f"{prefix}/models/model-1.safetensors")
    assert reader.fetch_file("models/model-1.safetensors").read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError):
        ObjectStore(bucket, tmp_path / "third").fetch_file("models/model-1.safetensors")


def test_deleting_removes_the_objects_and_the_local_copy(bucket, tmp_path):
    store = ObjectStore(bucket, tmp_path / "data")
    write_dataset(store.cache, "datasets/ds-1")
    write_dataset(store.cache, "datasets/ds-10")  # a key that starts like it
    store.put("datasets/ds-1")
    store.put("datasets/ds-10")
    store.delete("datasets/ds-1", folder=True)
    assert not (store.cache / "datasets" / "ds-1").exists()
    assert all(key.startswith("datasets/ds-10/") for key in bucket_keys(bucket))
    assert len(bucket_keys(bucket)) == 3
    store.delete("datasets/ds-1", folder=True)  # gone already: not an error
    with pytest.raises(FileNotFoundError):
        ObjectStore(bucket, tmp_path / "other").fetch_folder("datasets/ds-1")


def test_a_store_that_fails_is_a_storage_error_without_its_secrets(
    s3_endpoint, monkeypatch, tmp_path, caplog
):
    new_bucket(s3_endpoint, monkeypatch)  # the variables; not this bucket
    store = ObjectStore("s3://maskrcnn-no-such-bucket/service", tmp_path / "data")
    write_dataset(store.cache, "datasets/ds-1")
    with caplog.at_level(logging.ERROR), pytest.raises(StorageError) as refused:
        store.put("datasets/ds-1")
    assert refused.value.status_code == 503 and refused.value.code == "storage_unavailable"
    assert "storing datasets/ds-1" in refused.value.message
    assert "maskrcnn-no-such-bucket" in caplog.text  # the operator's detail, in the log
    for secret in S3_CREDENTIALS.values():
        assert secret not in refused.value.message and secret not in caplog.text


def test_an_upload_the_store_refuses_is_503_and_leaves_nothing(s3_endpoint, monkeypatch, tmp_path):
    from model.training.synthetic import generate_dataset

    new_bucket(s3_endpoint, monkeypatch)  # the variables; not this bucket
    archive = tmp_path / "shapes.zip"
    generate_dataset(archive, num_images=2, image_size=64, seed=3)
    data_dir = tmp_path / "data"
    refusing = "s3://maskrcnn-no-such-bucket/service"
    with fake_client(admin_token=ADMIN_TOKEN, storage_url=refusing, data_dir=data_dir) as client:
        response = upload_dataset(client, archive.read_bytes(), "shapes.zip")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert error["code"] == "storage_unavailable" and "datasets/ds-" in error["message"]
        assert "maskrcnn-no-such-bucket" not in error["message"]
        assert client.get("/v1/datasets", headers=AS_ADMIN).json()["count"] == 0
    assert not list((data_dir / "datasets").iterdir()) and not list((data_dir / "tmp").iterdir())
