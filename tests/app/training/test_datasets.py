"""``/v1/datasets``: the evil-archive suite (each refused with 400 and nothing left
on disk, inside or outside ``DATA_DIR``), a good upload stored where training
reads it, listing, deletion and its conflicts, body caps and admin auth; one
round trip through a real ``maskrcnn serve`` on PostgreSQL."""

import io
import json
import os
import stat
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from app.store.db import Database, TrainingJobRecord, new_id, utcnow
from model.training.dataset import CocoDataset
from model.training.synthetic import SHAPE_CLASSES, generate_dataset
from tests.app.conftest import (
    ADMIN_TOKEN,
    AS_ADMIN,
    add_dataset,
    fake_client,
    job_store,
    png_bytes,
    running_server,
    set_job,
)
from tests.app.conftest import upload_dataset as upload

H, W = 40, 60


# -- building zips ------------------------------------------------------------------


def small_coco() -> dict:
    """One 60x40 image with a polygon and an RLE annotation: valid as it is."""
    return {
        "images": [{"id": 1, "file_name": "images/0.png", "width": W, "height": H}],
        "categories": [{"id": 3, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 15], "iscrowd": 0,
             "segmentation": [[5, 5, 25, 5, 25, 20, 5, 20]], "area": 300},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 2], "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": [0, 2, H * W - 2]}, "area": 2},
        ],
    }  # fmt: skip


def image_bytes(height: int = H, width: int = W) -> bytes:
    return png_bytes(np.full((height, width, 3), 90, dtype=np.uint8))


def zip_bytes(members: dict, coco: dict | None = None) -> bytes:
    """``members``: name or ``ZipInfo`` → bytes; ``coco`` becomes ``annotations.json``
    and ``images/0.png`` is added unless ``members`` has it."""
    members = dict(members)
    if coco is not None:
        members.setdefault("images/0.png", image_bytes())
        members["annotations.json"] = json.dumps(coco).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def with_member(name, data: bytes) -> bytes:
    """A valid dataset plus one more member."""
    return zip_bytes({name: data}, small_coco())


def with_coco(change) -> bytes:
    coco = small_coco()
    change(coco)
    return zip_bytes({}, coco)


def million_vertices() -> list[int]:
    """Random points inside the image: a regular pattern would trip the zip-bomb ratio."""
    rng = np.random.default_rng(0)
    return rng.integers(0, [W, H], (1_000_000, 2)).ravel().tolist()


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.fixture(scope="module")
def zero_bomb(tmp_path_factory) -> bytes:
    """A valid dataset plus 1 GiB of zeros deflated to about 1 MB (~4 s to build)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", compresslevel=9) as archive:
        archive.writestr("annotations.json", json.dumps(small_coco()))
        archive.writestr("images/0.png", image_bytes())
        info = zipfile.ZipInfo("images/zeros.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            chunk = bytes(2**20)
            for _ in range(1024):
                member.write(chunk)
    return path.read_bytes()


@pytest.fixture(scope="module")
def many_members() -> bytes:
    """A valid dataset plus 100 000 empty members (zip64: more than 65 535 entries)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("annotations.json", json.dumps(small_coco()))
        archive.writestr("images/0.png", image_bytes())
        for i in range(100_000):
            archive.writestr(f"e/{i}", b"")
    return buffer.getvalue()


# -- the client and what it leaves on disk --------------------------------------------


@pytest.fixture
def admin(tmp_path) -> Iterator:
    """An in-process app whose ``DATA_DIR`` is ``root/sentinel/data``: a ``../`` that
    escaped a staging folder would land in ``root``, which is watched as a whole."""
    root = tmp_path / "root"
    with fake_client(admin_token=ADMIN_TOKEN, data_dir=root / "sentinel" / "data") as client:
        client.root, client.data_dir = root, root / "sentinel" / "data"
        client.before = tree(root)
        yield client


def tree(root: Path) -> set[str]:
    """Every path under ``root`` except the SQLite job store's files."""
    return {
        str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("maskrcnn.db")
    }


def assert_nothing_left(client) -> None:
    staging = client.data_dir / "tmp"
    assert not staging.exists() or not any(staging.iterdir())
    datasets = client.data_dir / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())
    new = tree(client.root) - client.before - {"sentinel/data/tmp", "sentinel/data/datasets"}
    assert not new, f"left on disk: {sorted(new)}"


def assert_rejected(client, data: bytes, *expected: str) -> str:
    response = upload(client, data)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    for text in expected:
        assert text in error["message"], error["message"]
    assert_nothing_left(client)
    assert client.get("/v1/datasets", headers=AS_ADMIN).json()["count"] == 0
    return error["message"]


# -- the evil-archive suite -----------------------------------------------------------


EVIL = {
    "dotdot": lambda root: with_member("../../../escaped.txt", b"evil"),
    "dotdot inside": lambda root: with_member("images/../../../../escaped.txt", b"evil"),
    "absolute": lambda root: with_member(f"{root}/absolute.txt", b"evil"),
    "backslash": lambda root: with_member("..\\..\\..\\escaped.txt", b"evil"),
    "symlink": lambda root: with_member(symlink("images/1.png"), b"/etc/passwd"),
    "nested zip": lambda root: with_member("images/inner.zip", zip_bytes({"a.png": b"x"})),
    "disguised zip": lambda root: with_member("images/1.png", zip_bytes({"a.png": b"x"})),
    "file_name": lambda root: with_coco(lambda c: c["images"][0].update(file_name="../../x")),
    "declared size": lambda root: with_coco(
        lambda c: c["images"][0].update(width=100_000, height=100_000)
    ),
    "million vertices": lambda root: with_coco(
        lambda c: c["annotations"][0].update(segmentation=[million_vertices()])
    ),
}
EXPECTED = {
    "dotdot": "'../../../escaped.txt': '..' in the path",
    "dotdot inside": "'images/../../../../escaped.txt': '..' in the path",
    "absolute": "absolute.txt': an absolute path",
    "backslash": "'..\\\\..\\\\..\\\\escaped.txt': a backslash in the path",
    "symlink": "'images/1.png': a symbolic link",
    "nested zip": "'images/inner.zip': an archive inside the archive (by its name)",
    "disguised zip": "'images/1.png': an archive inside the archive (zip data)",
    "file_name": "images[0]: file_name '../../x' is not a safe relative path ('..' in the path)",
    "declared size": "images[0]: declares 100000x100000 = 10000000000 pixels; at most 40000000",
    "million vertices": "annotations[0]: polygon 0 has 1000000 vertices; at most 10000",
}


@pytest.mark.parametrize("case", list(EVIL))
def test_evil_archive_is_rejected_and_leaves_nothing(admin, case):
    if case == "file_name":  # a file the escaped name would reach: it must not count
        (admin.data_dir / "x").write_bytes(image_bytes())
        admin.before = tree(admin.root)
    message = assert_rejected(admin, EVIL[case](admin.root), EXPECTED[case])
    assert message.startswith("the dataset was rejected: ")


def test_gigabyte_of_zeros_is_stopped_while_inflating(admin, zero_bomb):
    assert len(zero_bomb) < 2 * 2**20
    assert_rejected(admin, zero_bomb, "'images/zeros.bin': inflates to more than 100× its ")


def test_hundred_thousand_members_are_refused_before_parsing(admin, many_members):
    assert_rejected(admin, many_members, "more than 50000 entries (MASKRCNN_MAX_DATASET_FILES)")


def test_every_archive_problem_is_listed(admin):
    members = {
        "../a.txt": b"x",
        "/abs.txt": b"x",
        "b\\c.txt": b"x",
        symlink("images/link"): b"/",
        "images/inner.tar": b"x",
    }
    assert_rejected(
        admin,
        zip_bytes(members, small_coco()),
        "'../a.txt': '..' in the path",
        "'/abs.txt': an absolute path",
        "'b\\\\c.txt': a backslash in the path",
        "'images/link': a symbolic link",
        "'images/inner.tar': an archive inside the archive",
    )


def test_every_annotation_problem_is_listed(admin):
    coco = small_coco()
    coco["images"].append({"id": 2, "file_name": "images/1.png", "width": 10, "height": 10})
    coco["images"].append({"id": 3, "file_name": "images/missing.png", "width": W, "height": H})
    coco["images"].append({"id": 4, "file_name": "notes.png", "width": W, "height": H})
    valid = small_coco()["annotations"][1]
    coco["annotations"][0]["category_id"] = 99
    coco["annotations"][1]["bbox"] = [55, 30, 10, 20]
    bad_rle = {**valid, "id": 3, "segmentation": {"size": [H, W], "counts": [0, 2, 5]}}
    coco["annotations"] += [bad_rle, valid]  # the last one repeats id 2
    members = {"images/1.png": image_bytes(12, 10), "notes.png": b"just text"}
    assert_rejected(
        admin,
        zip_bytes(members, coco),
        "images[1]: images/1.png: declared 10x10 but the file is 10x12",
        "images[2]: file_name 'images/missing.png' is not in the dataset",
        "images[3]: notes.png is not a JPEG, PNG, WebP or BMP image",
        "annotations[0]: category_id 99 names no category",
        "annotations[1]: bbox [55, 30, 10, 20] is not inside the 60x40 image",
        "annotations[2]: RLE counts cover 7 pixels; the 60x40 image has 2400",
        "annotations[3]: id 2 is used twice",
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PK\x03\x04 but not really", "not a zip file"),
        (zip_bytes({"images/0.png": image_bytes()}), "the zip has no annotations.json at its root"),
        (
            zip_bytes({"shapes/annotations.json": b"{}"}),
            "(found 'shapes/annotations.json': zip the folder's contents, not the folder)",
        ),
        (zip_bytes({"annotations.json": b"{not json"}), "annotations.json: not valid JSON"),
        (zip_bytes({"annotations.json": b'{"images": NaN}'}), "NaN is not a JSON number"),
        (zip_bytes({"annotations.json": b"[]"}), "must be an object with lists 'images'"),
        (
            zip_bytes({"annotations.json": b"[" * 100_000 + b"]" * 100_000}),
            "annotations.json: not valid JSON (nested too deeply)",
        ),
        (
            with_coco(lambda c: c["annotations"][0].update(image_id=[1], category_id={})),
            "annotations[0]: image_id [1] names no image",
        ),
        (
            with_coco(lambda c: c["annotations"][1].update(area=10**400)),
            "annotations[1]: area must be a number ≥ 0",
        ),
        (
            with_coco(lambda c: c["images"][0].update(file_name="images/\ud800.png")),
            "images[0]: file_name 'images/\\ud800.png' is not a safe relative path (a lone",
        ),
        (  # stored, this name would break every later answer that lists it
            with_coco(lambda c: c["categories"][0].update(name="\ud800")),
            "categories[0]: the name is no Unicode text",
        ),
    ],
)
def test_unreadable_uploads_are_rejected(admin, data, expected):
    assert_rejected(admin, data, expected)


# -- a good dataset -------------------------------------------------------------------


def test_good_upload_is_stored_for_training_listed_and_deleted(admin, tmp_path):
    source = tmp_path / "inputs" / "shapes.zip"
    coco = generate_dataset(source, num_images=4, image_size=64, seed=3, max_objects=3)
    response = upload(admin, source.read_bytes(), filename="shapes.zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "shapes" and body["id"].startswith("ds-")
    assert body["num_images"] == 4 and body["num_annotations"] == len(coco["annotations"]) > 0
    assert body["categories"] == [{"id": c["id"], "name": c["name"]} for c in SHAPE_CLASSES]
    with zipfile.ZipFile(source) as archive:
        assert body["size_bytes"] == sum(info.file_size for info in archive.infolist())
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"

    folder = admin.data_dir / "datasets" / body["id"]
    stored, original = CocoDataset(folder), CocoDataset(source)
    assert len(stored) == len(original) == 4
    for (image, target), (image0, target0) in zip(stored, original, strict=True):
        assert torch.equal(image, image0)
        assert all(torch.equal(target[k], target0[k]) for k in target0)
    assert not any((admin.data_dir / "tmp").iterdir())

    assert admin.get(f"/v1/datasets/{body['id']}", headers=AS_ADMIN).json() == body
    listed = admin.get("/v1/datasets", headers=AS_ADMIN).json()
    assert listed == {"data": [body], "count": 1}

    assert admin.delete(f"/v1/datasets/{body['id']}", headers=AS_ADMIN).status_code == 204
    assert not folder.exists()
    assert admin.get(f"/v1/datasets/{body['id']}", headers=AS_ADMIN).status_code == 404
    assert admin.delete(f"/v1/datasets/{body['id']}", headers=AS_ADMIN).status_code == 404
    assert_nothing_left(admin)


def test_list_is_newest_first_and_paged(admin):
    ids = []
    for name in ("first", "second", "third"):
        response = upload(admin, zip_bytes({}, small_coco()), name=name)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    page = admin.get("/v1/datasets", params={"limit": 2}, headers=AS_ADMIN).json()
    assert page["count"] == 3 and [d["name"] for d in page["data"]] == ["third", "second"]
    rest = admin.get("/v1/datasets", params={"offset": 2}, headers=AS_ADMIN).json()
    assert [d["id"] for d in rest["data"]] == ids[:1]
    bad = admin.get("/v1/datasets", params={"limit": 0}, headers=AS_ADMIN)
    assert bad.status_code == 422


def add_job(db: Database, dataset_id: str, state: str) -> str:
    job_id = new_id("job")
    running = {"worker_id": "test", "started_at": utcnow(), "heartbeat_at": utcnow()}
    with db.session() as session:
        session.add(
            TrainingJobRecord(
                id=job_id,
                dataset_id=dataset_id,
                config={},
                state=state,
                **(running if state == "running" else {}),
            )
        )
    return job_id


@pytest.mark.parametrize("state", ["queued", "running"])
def test_delete_is_refused_while_a_job_uses_the_dataset(tmp_path, state):
    with fake_client(
        admin_token=ADMIN_TOKEN, data_dir=tmp_path / "data", run_worker=False
    ) as client:
        dataset_id = upload(client, zip_bytes({}, small_coco())).json()["id"]
        db = client.app.state.service.db
        job_id = add_job(db, dataset_id, state)
        response = client.delete(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN)
        assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
        assert f"used by training job {job_id} ({state})" in response.json()["error"]["message"]
        assert (tmp_path / "data" / "datasets" / dataset_id / "annotations.json").is_file()
        assert client.get(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN).status_code == 200

        # once the job is final the dataset can go; the job keeps its id as history
        set_job(db, job_id, state="cancelled")
        assert client.delete(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN).status_code == 204
        assert not (tmp_path / "data" / "datasets" / dataset_id).exists()
        with db.session() as session:
            assert session.get(TrainingJobRecord, job_id).dataset_id == dataset_id


# -- limits and auth ------------------------------------------------------------------


def test_dataset_cap_replaces_the_upload_cap_on_its_route(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    data = zip_bytes({"images/noise.png": png_bytes(noise)}, small_coco())
    assert 2**15 < len(data) < 100_000
    small_uploads = {
        "max_upload_mb": 1 / 32,
        "admin_token": ADMIN_TOKEN,
        "data_dir": tmp_path / "a",
    }
    with fake_client(**small_uploads) as client:
        assert upload(client, data).status_code == 201
        files = {"images": ("big.png", data, "image/png")}
        response = client.post("/v1/segment", files=files)
        assert response.status_code == 413 and "(MAX_UPLOAD_MB)" in response.text
    small_datasets = {
        "max_dataset_mb": 1 / 32,
        "admin_token": ADMIN_TOKEN,
        "data_dir": tmp_path / "b",
    }
    with fake_client(**small_datasets) as client:
        response = upload(client, data)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        assert "0.03125 MB limit (MAX_DATASET_MB)" in response.json()["error"]["message"]
        assert not (tmp_path / "b" / "datasets").exists() and not (tmp_path / "b" / "tmp").exists()


ROUTES = [
    ("post", "/v1/datasets"),
    ("get", "/v1/datasets"),
    ("get", "/v1/datasets/ds-000000000000"),
    ("delete", "/v1/datasets/ds-000000000000"),
]


def test_admin_token_is_required(tmp_path):
    inference = "inference-token"
    with fake_client(admin_token=ADMIN_TOKEN, api_tokens=inference, data_dir=tmp_path) as client:
        for method, path in ROUTES:
            for headers, status in [
                ({}, 401),
                ({"Authorization": "Bearer not-the-token"}, 401),
                ({"Authorization": f"Bearer {inference}"}, 403),
            ]:
                kwargs = {"files": {"file": ("d.zip", b"x")}} if method == "post" else {}
                response = client.request(method, path, headers=headers, **kwargs)
                assert response.status_code == status, (method, path, headers, response.text)
        assert client.get("/v1/datasets", headers=AS_ADMIN).status_code == 200


def test_admin_routes_are_off_without_an_admin_token(tmp_path):
    with fake_client(data_dir=tmp_path) as client:
        for method, path in ROUTES:
            response = client.request(method, path, headers=AS_ADMIN)
            assert response.status_code == 403
            error = response.json()["error"]
            assert error["code"] == "admin_disabled" and "MASKRCNN_ADMIN_TOKEN" in error["message"]


# -- a real server on PostgreSQL -----------------------------------------------------


@pytest.mark.slow
def test_real_server_on_postgresql(checkpoint, tmp_path, postgres_url):
    data_dir = tmp_path / "data"
    env = {"admin_token": ADMIN_TOKEN, "database_url": postgres_url, "run_worker": "false"}
    with running_server(checkpoint, tmp_path, data_dir=data_dir, **env) as server:
        server.wait_ready()
        client = server.client
        created = upload(client, zip_bytes({}, small_coco()), filename="good.zip")
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        assert created.json()["num_annotations"] == 2

        refused = upload(client, EVIL["dotdot"](tmp_path), filename="evil.zip")
        assert refused.status_code == 400 and EXPECTED["dotdot"] in refused.text
        assert refused.json()["error"]["request_id"] == refused.headers["x-request-id"]
        assert not (tmp_path / "escaped.txt").exists()
        assert client.get("/v1/datasets", headers=AS_ADMIN).json()["count"] == 1

        db = job_store(data_dir, postgres_url)
        try:
            job_id = add_job(db, dataset_id, "running")
            conflict = client.delete(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN)
            assert conflict.status_code == 409 and job_id in conflict.text
            set_job(db, job_id, state="failed")
        finally:
            db.dispose()
        assert client.delete(f"/v1/datasets/{dataset_id}", headers=AS_ADMIN).status_code == 204
        assert client.get("/v1/datasets", headers=AS_ADMIN).json() == {"data": [], "count": 0}
        assert not any((data_dir / "datasets").iterdir()) and not any((data_dir / "tmp").iterdir())


def test_start_up_sweeps_what_a_crashed_upload_left_but_not_a_fresh_one(tmp_path):
    data_dir = tmp_path / "data"
    stale, fresh = data_dir / "tmp" / "ds-crashed-1", data_dir / "tmp" / "ds-uploading-2"
    for folder in (stale, fresh):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "a.png").write_bytes(b"half written")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    with fake_client(admin_token=ADMIN_TOKEN, data_dir=data_dir, run_worker=False):
        assert not stale.exists()
        assert (fresh / "images" / "a.png").read_bytes() == b"half written"


def test_counts_past_their_settings_are_refused_naming_each(tmp_path):
    def many(coco):
        coco["categories"] += [{"id": 100 + i, "name": f"c{i}"} for i in range(5)]
        coco["annotations"] += [{**coco["annotations"][0], "id": 10 + i} for i in range(3)]

    limits = {"max_dataset_categories": 5, "max_dataset_annotations": 4}
    with fake_client(admin_token=ADMIN_TOKEN, data_dir=tmp_path / "data", **limits) as client:
        response = upload(client, with_coco(many))
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_dataset"
        message = response.json()["error"]["message"]
        for expected in (
            "annotations.json lists 6 categories; at most 5 (MAX_DATASET_CATEGORIES)",
            "annotations.json lists 5 annotations; at most 4 (MAX_DATASET_ANNOTATIONS)",
        ):
            assert expected in message, message
        assert "MAX_DATASET_IMAGES" not in message
        assert client.get("/v1/datasets", headers=AS_ADMIN).json()["count"] == 0
        assert upload(client, with_coco(lambda coco: None)).status_code == 201  # still served


def test_training_jobs_and_models_are_listed_a_page_at_a_time(tmp_path):
    with fake_client(admin_token=ADMIN_TOKEN, data_dir=tmp_path / "data") as client:
        db = client.app.state.service.db
        dataset_id = add_dataset(db, num_images=2)
        made = [add_job(db, dataset_id, "succeeded") for _ in range(5)]
        pages = [
            client.get(f"/v1/training-jobs?offset={offset}&limit=2", headers=AS_ADMIN).json()
            for offset in (0, 2, 4)
        ]
        assert [page["count"] for page in pages] == [5, 5, 5]
        listed = [job["id"] for page in pages for job in page["data"]]
        assert sorted(listed) == sorted(made) and len(set(listed)) == 5
        first = client.get("/v1/models?limit=1").json()
        assert len(first["data"]) == 1 and first["data"][0]["active"] and first["count"] >= 1


def test_past_max_datasets_an_upload_is_refused_until_one_is_deleted(tmp_path):
    limits = {"admin_token": ADMIN_TOKEN, "data_dir": tmp_path / "data", "max_datasets": 2}
    with fake_client(**limits) as client:
        data = zip_bytes({}, small_coco())
        stored = [upload(client, data).json()["id"] for _ in range(2)]
        response = upload(client, data)
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_datasets" and "MAX_DATASETS" in error["message"]
        assert "at most 2" in error["message"]
        assert len(list((tmp_path / "data" / "datasets").iterdir())) == 2  # nothing more kept
        assert not any((tmp_path / "data" / "tmp").iterdir())
        assert client.delete(f"/v1/datasets/{stored[0]}", headers=AS_ADMIN).status_code == 204
        assert upload(client, data).status_code == 201
