"""The downloader against local archives in the real formats: layout, reuse, resume, checksums."""

import hashlib
import http.server
import io
import os
import pathlib
import pickle
import tarfile
import threading

import numpy as np
import pytest

from lra_benchmarks.data import download, get_task


def _targz(path: pathlib.Path, files: dict) -> pathlib.Path:
  """Writes a tar.gz holding ``files`` ({member name: bytes}) and their folders."""
  folders = sorted({str(pathlib.PurePosixPath(n).parent) for n in files} - {"."})
  with tarfile.open(path, "w:gz") as tar:
    for folder in folders:
      info = tarfile.TarInfo(folder)
      info.type = tarfile.DIRTYPE
      tar.addfile(info)
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _png(value: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.full((32, 32), value, np.uint8), mode="L").save(buf, format="PNG")
  return buf.getvalue()


LISTOPS_TSV = b"Source\tTarget\r\n( ( [MAX 2 ) 9 ] )\t9\r\n( ( [MIN 4 ) 7 ] )\t4\r\n"
AAN_TSV = b"1\ta\tb\tfirst paper\tsecond paper\n0\tc\td\tthird\tfourth\n"


def _lra_files() -> dict:
  """The LRA release's layout: listops-1000 at two depths, tsv_data and pathfinder32 nested."""
  files = {}
  for prefix in ("lra_release/", "lra_release/lra_release/"):
    for split in ("train", "val", "test"):
      files[f"{prefix}listops-1000/basic_{split}.tsv"] = LISTOPS_TSV
  for split in ("train", "eval", "test"):
    files[f"lra_release/lra_release/tsv_data/new_aan_pairs.{split}.tsv"] = AAN_TSV
  curv = "lra_release/lra_release/pathfinder32/curv_contour_length_14/"
  files[curv + "metadata/0.npy"] = "".join(
      f"imgs/0 sample_{i}.png {i} {i % 2} 0 0\n" for i in range(10)).encode()
  for i in range(10):
    files[curv + f"imgs/0/sample_{i}.png"] = _png(20 * i)
  return files


@pytest.fixture(scope="module")
def lra_archive(tmp_path_factory):
  return _targz(tmp_path_factory.mktemp("src") / "lra_release.gz", _lra_files())


def test_lra_release_unpacks_to_every_loaders_layout_and_is_fetched_once(lra_archive, tmp_path):
  copy = tmp_path / "copy.gz"
  copy.write_bytes(lra_archive.read_bytes())
  dest = str(tmp_path / "data")
  download.download_task("listops", dest, url=copy.as_uri(), progress=False)
  copy.unlink()  # retrieval and pathfinder must reuse the archive in dest/downloads
  download.download_task("retrieval", dest, url=copy.as_uri(), progress=False)
  download.download_task("pathfinder", dest, url=copy.as_uri(), progress=False)
  assert sorted(os.listdir(dest)) == ["downloads", "listops-1000", "pathfinder32", "tsv_data"]

  listops = get_task("listops").load("test", data_dir=dest)
  np.testing.assert_array_equal(listops["targets"], [9, 4])
  retrieval = get_task("retrieval").load("train", data_dir=dest)
  np.testing.assert_array_equal(retrieval["targets"], [1, 0])
  assert retrieval["inputs1"][0, 0] == ord("f") + 1
  pathfinder = [get_task("pathfinder").load(s, data_dir=dest, cache=False)
                for s in ("train", "validation", "test")]
  pixels = np.concatenate([p["inputs"][:, 0] for p in pathfinder])
  assert sorted(pixels.tolist()) == [20 * i for i in range(10)]


def test_a_folder_missing_from_the_archive_is_an_error_and_leaves_nothing(lra_archive, tmp_path):
  dest = tmp_path / "data"
  with pytest.raises(download.UnsafeArchiveError, match="pathfinder64"):
    download.download_task("pathfinder", str(dest), resolutions=(64,), url=lra_archive.as_uri(),
                           progress=False)
  assert sorted(os.listdir(dest)) == ["downloads"]


def _imdb_files() -> dict:
  files = {"aclImdb/imdb.vocab": b"the\n", "aclImdb/train/unsup/0_0.txt": b"unlabelled"}
  for split in ("train", "test"):
    files[f"aclImdb/{split}/neg/0_2.txt"] = b"bad film"
    files[f"aclImdb/{split}/pos/0_9.txt"] = b"good film"
  return files


def cifar_files() -> dict:
  def batch(seed):
    data = np.random.default_rng(seed).integers(0, 256, (2, 3072), dtype=np.uint8)
    return pickle.dumps({b"data": data, b"labels": [seed % 10, 3]})
  files = {f"cifar-10-batches-py/data_batch_{i}": batch(i) for i in range(1, 6)}
  files["cifar-10-batches-py/test_batch"] = batch(0)
  return files


@pytest.mark.parametrize("task,files,folder", [("text", _imdb_files, "aclImdb"),
                                               ("image", cifar_files, "cifar-10-batches-py")])
def test_imdb_and_cifar_unpack_for_their_loaders(task, files, folder, tmp_path):
  archive = _targz(tmp_path / "archive.tar.gz", files())
  digest = hashlib.sha256(archive.read_bytes()).hexdigest()
  dest = str(tmp_path / "data")
  assert download.main([f"--task={task}", f"--dest={dest}", f"--url={archive.as_uri()}",
                        f"--sha256={digest}", "--quiet"]) == 0
  assert sorted(os.listdir(dest)) == sorted(["downloads", folder])
  test = get_task(task).load("test", data_dir=dest)
  if task == "text":
    assert not os.path.exists(os.path.join(dest, "aclImdb", "train", "unsup"))
    np.testing.assert_array_equal(test["targets"], [0, 1])
    assert test["inputs"][1, :4].tolist() == [b + 1 for b in b"good"]
  else:
    np.testing.assert_array_equal(test["targets"], [0, 3])
    assert test["inputs"].shape == (2, 1024)


def test_resume_appends_to_the_part_file(lra_archive, tmp_path):
  data = lra_archive.read_bytes()
  part = tmp_path / "lra_release.gz.part"
  part.write_bytes(data[:len(data) // 2])
  download.fetch(lra_archive.as_uri(), str(part), progress=False)
  assert part.read_bytes() == data


def test_a_wrong_part_file_fails_the_checksum_and_is_deleted(lra_archive, tmp_path):
  data = lra_archive.read_bytes()
  dest = tmp_path / "data"
  part = dest / "downloads" / "lra_release.gz.part"
  part.parent.mkdir(parents=True)
  part.write_bytes(bytes(len(data) // 2))  # resumed: the prefix is kept, so the file is wrong
  with pytest.raises(download.ChecksumError, match="sha256"):
    download.download_task("listops", str(dest), url=lra_archive.as_uri(),
                           sha256=hashlib.sha256(data).hexdigest(), progress=False)
  assert os.listdir(dest) == ["downloads"] and os.listdir(dest / "downloads") == []
  assert download.main(["--task=listops", f"--dest={dest}", f"--url={lra_archive.as_uri()}",
                        f"--sha256={hashlib.sha256(data).hexdigest()}", "--quiet"]) == 0


def _server(data: bytes, honour_range: bool, cut: int | None = None):
  """A local HTTP server of ``data`` (``Range: bytes=N-`` answered with 206 if
  ``honour_range``; the connection dropped after ``cut`` bytes if given); returns
  (server, list of Range headers received)."""
  ranges = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      ranges.append(self.headers.get("Range"))
      start = 0
      if honour_range and self.headers.get("Range"):
        start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
      else:
        self.send_response(200)
      self.send_header("Content-Length", str(len(data) - start))
      self.end_headers()
      self.wfile.write(data[start:cut])

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, ranges


@pytest.mark.parametrize("honour_range", [True, False])
def test_http_resume_with_and_without_range_support(lra_archive, tmp_path, honour_range):
  data = lra_archive.read_bytes()
  server, ranges = _server(data, honour_range)
  try:
    path = tmp_path / "lra_release.gz.part"
    path.write_bytes(data[:len(data) // 2])
    download.fetch(f"http://127.0.0.1:{server.server_port}/lra_release.gz", str(path),
                   progress=False)
  finally:
    server.shutdown()
    server.server_close()
  assert ranges == [f"bytes={len(data) // 2}-"]
  assert path.read_bytes() == data


def test_members_outside_dest_are_refused(tmp_path):
  archive = _targz(tmp_path / "evil.tar.gz", {"aclImdb/../../evil.txt": b"x"})
  with pytest.raises(download.UnsafeArchiveError, match="outside DEST"):
    download.unpack(str(archive), str(tmp_path / "data"), download.IMDB, ["aclImdb"],
                    progress=False)
  assert not (tmp_path.parent / "evil.txt").exists()


def test_bad_task_and_resolution_name_the_valid_choices():
  with pytest.raises(ValueError, match="valid tasks"):
    download.task_folders("cifar")
  with pytest.raises(ValueError, match=r"\(32, 64, 128, 256\)"):
    download.task_folders("pathfinder", (48,))


def test_an_interrupted_transfer_keeps_its_bytes_and_the_next_run_finishes(lra_archive, tmp_path):
  data = lra_archive.read_bytes()
  part = tmp_path / "lra_release.gz.part"
  for cut, expected_ranges in ((len(data) // 3, [None]), (None, [f"bytes={len(data) // 3}-"])):
    server, ranges = _server(data, honour_range=True, cut=cut)
    url = f"http://127.0.0.1:{server.server_port}/lra_release.gz"
    try:
      if cut is None:
        download.fetch(url, str(part), progress=False)
      else:
        with pytest.raises(download.DownloadError, match="rerun to resume"):
          download.fetch(url, str(part), progress=False)
    finally:
      server.shutdown()
      server.server_close()
    assert ranges == expected_ranges
  assert part.read_bytes() == data
