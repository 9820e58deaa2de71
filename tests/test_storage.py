"""The storage layer on a local directory and on a real S3-compatible server (moto, on 127.0.0.1)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
import torch

from raynas import storage
from raynas.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trips_bytes_text_json_parquet_and_torch(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01"
    storage.write_json(storage.join(root, "meta.json"), {"epoch": 3})
    assert storage.read_json(storage.join(root, "meta.json")) == {"epoch": 3}
    frame = pd.DataFrame({"arch": ["x", "y"], "acc": [0.5, 0.75]})
    storage.write_pandas(storage.join(root, "t.parquet"), frame)
    pd.testing.assert_frame_equal(storage.read_pandas(storage.join(root, "t.parquet")), frame)
    storage.save_torch(storage.join(root, "w.pt"), {"w": torch.arange(4.0)})
    assert torch.equal(storage.load_torch(storage.join(root, "w.pt"))["w"], torch.arange(4.0))

    assert storage.list_dir(root) == ["a", "meta.json", "t.parquet", "w.pt"]
    assert [storage.basename(p) for p in storage.list_files(root, ".parquet")] == ["t.parquet"]
    assert storage.is_dir(storage.join(root, "a")) and storage.is_file(storage.join(root, "w.pt"))
    assert storage.list_dir(storage.join(root, "missing")) == []
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "b.bin"))


def test_writes_leave_no_temporary_files_and_replace_whole_files(root):
    target = storage.join(root, "summary.yaml")
    storage.write_text(target, "first")
    storage.write_text(target, "second")
    assert storage.read_text(target) == "second"
    assert storage.list_dir(root) == ["summary.yaml"]


def test_missing_and_corrupt_files_are_one_line_naming_the_file(root):
    with pytest.raises(StorageError, match=r"^lut: .*nope\.parquet does not exist$"):
        storage.read_table(storage.join(root, "nope.parquet"), "lut")
    storage.write_bytes(storage.join(root, "bad.parquet"), b"PAR1 not really")
    with pytest.raises(StorageError, match=r"^lut: .*bad\.parquet is not a readable Parquet file"):
        storage.read_table(storage.join(root, "bad.parquet"), "lut")
    storage.write_bytes(storage.join(root, "bad.json"), bytes(range(256)))
    with pytest.raises(StorageError, match=r"^calibration: .*bad\.json is not UTF-8 text$"):
        storage.read_json(storage.join(root, "bad.json"), "calibration")


def test_unwritable_location_is_refused_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"^--out: .*file/sub is not writable"):
        storage.check_writable(str(blocker / "sub"), "--out")


def test_unknown_scheme_names_the_location():
    with pytest.raises(StorageError, match=r"^location: cannot open nosuch://b/p"):
        storage.exists("nosuch://b/p")


def test_paths_and_uris_join_alike(tmp_path):
    assert storage.join("s3://b/runs", "x", "y.parquet") == "s3://b/runs/x/y.parquet"
    assert storage.parent("s3://b/runs/x") == "s3://b/runs"
    assert storage.basename("s3://b/runs/x/") == "x"
    assert storage.normalize("rel/dir") .endswith("/rel/dir") and storage.normalize("s3://b/p/") == "s3://b/p"
    assert storage.is_local(str(tmp_path)) and storage.is_local("file:///tmp") and not storage.is_local("s3://b")


def test_s3_objects_are_visible_to_a_separate_client(s3_bucket):
    import boto3

    storage.write_table(storage.join(s3_bucket, "runs", "t.parquet"), pa.table({"x": [1, 2]}))
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert "runs/t.parquet" in keys
