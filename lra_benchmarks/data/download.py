r"""Downloads and unpacks the public LRA sources, so that ``data_dir=DEST`` serves every task.

  python -m lra_benchmarks.data.download --task=TASK --dest=DEST [--resolutions=32,128]

then train with ``--config.data_dir=DEST``. Layout of ``DEST`` (what each loader looks for):

  ========== ================================================= ==============================
  task       folder under DEST                                 source archive
  ========== ================================================= ==============================
  listops    ``listops-1000/basic_{train,val,test}.tsv``       LRA release ``lra_release.gz``
  retrieval  ``tsv_data/new_aan_pairs.{train,eval,test}.tsv``  LRA release
  pathfinder ``pathfinder{R}/curv_*/{metadata,imgs}``          LRA release
  text       ``aclImdb/{train,test}/{neg,pos}/*.txt``          IMDB ``aclImdb_v1.tar.gz``
  image      ``cifar-10-batches-py/{data_batch_*,test_batch}`` CIFAR-10 python version
  ========== ================================================= ==============================

ListOps needs no download (the loader generates it); this fetches LRA's original files.
The LRA release (several GB) unpacks as ``lra_release/listops-1000`` and
``lra_release/lra_release/{listops-1000,tsv_data,pathfinder*}``; both prefixes are removed.
IMDB's unlabelled ``train/unsup`` reviews (unused by the loader) are skipped.

Downloads go to ``DEST/downloads/<file>.part`` and resume from there (HTTP ``Range``, or a
seek for ``file://`` URLs); a complete file is checked against the checksum published for it
(IMDB: SHA-256 recorded by TensorFlow Datasets; CIFAR-10: MD5 on the CIFAR-10 page; the LRA
release has no published checksum, so only its SHA-256 is printed, for ``--sha256`` next
time) and only then renamed to ``DEST/downloads/<file>``, where later tasks reuse it. A
mismatch deletes the ``.part`` and raises ``ChecksumError``; a failed transfer keeps it and
raises ``DownloadError``. Each folder is unpacked to
``DEST/.unpacking`` and moved into place when complete, so a folder in ``DEST`` is whole;
rerunning skips the folders already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import posixpath
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, Callable, Sequence

from tqdm.auto import tqdm

_CHUNK = 1 << 20
DOWNLOADS = "downloads"
_UNPACKING = ".unpacking"


@dataclasses.dataclass(frozen=True)
class Source:
  """One public archive: where it is, what it must hash to, and how its members map to DEST.

  ``strip``: leading path components removed (repeatedly) from member names;
  ``skip``: prefixes (after stripping) of members not unpacked.
  """
  name: str
  url: str
  filename: str
  sha256: str | None = None
  md5: str | None = None
  size: int | None = None
  strip: tuple[str, ...] = ()
  skip: tuple[str, ...] = ()


LRA_RELEASE = Source(
    "LRA release", "https://storage.googleapis.com/long-range-arena/lra_release.gz",
    "lra_release.gz", strip=("lra_release",))
IMDB = Source(
    "IMDB (Large Movie Review Dataset v1)",
    "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz", "aclImdb_v1.tar.gz",
    sha256="c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe", size=84125825,
    skip=("aclImdb/train/unsup/",))
CIFAR10 = Source(
    "CIFAR-10 (python version)", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a")

PATHFINDER_RESOLUTIONS = (32, 64, 128, 256)


def task_folders(task: str, resolutions: Sequence[int] = (32,)) -> tuple[Source, tuple[str, ...]]:
  """The source archive of ``task`` and the top-level folders it needs under DEST.

  ``resolutions`` (pathfinder only): image sides to unpack (Path-X is 128).
  Raises ValueError naming the valid tasks or resolutions.
  """
  if task == "pathfinder":
    bad = [r for r in resolutions if r not in PATHFINDER_RESOLUTIONS]
    if bad or not resolutions:
      raise ValueError(f"pathfinder resolutions must be a non-empty subset of "
                       f"{PATHFINDER_RESOLUTIONS}, got {tuple(resolutions)}")
    return LRA_RELEASE, tuple(f"pathfinder{r}" for r in resolutions)
  table = {"listops": (LRA_RELEASE, ("listops-1000",)),
           "retrieval": (LRA_RELEASE, ("tsv_data",)),
           "text": (IMDB, ("aclImdb",)),
           "image": (CIFAR10, ("cifar-10-batches-py",))}
  if task not in table:
    raise ValueError(f"unknown task {task!r}; valid tasks: {sorted([*table, 'pathfinder'])}")
  return table[task]


class DownloadError(RuntimeError):
  """A transfer failed; the ``.part`` file is kept, so rerunning resumes."""


class ChecksumError(ValueError):
  """A downloaded file does not match its published checksum (the file has been deleted)."""


class UnsafeArchiveError(ValueError):
  """An archive member would be written outside DEST, or the archive lacks a needed folder."""


# ------------------------------------------------------------------------------- transfer


def _open_from(url: str, offset: int) -> tuple[BinaryIO, int | None, int]:
  """Opens ``url`` from byte ``offset`` -> (stream, total size or None, start of the stream).

  ``start`` is ``offset`` when the server honoured the ``Range`` request (or for ``file://``),
  0 when it sent the whole file instead. A ``Range`` past the end (HTTP 416) returns an empty
  stream starting at ``offset``: the ``.part`` is already complete.
  """
  parsed = urllib.parse.urlparse(url)
  if parsed.scheme == "file":
    path = urllib.request.url2pathname(parsed.path)
    f = open(path, "rb")  # pylint: disable=consider-using-with
    f.seek(offset)
    return f, os.path.getsize(path), offset
  request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
  try:
    response = urllib.request.urlopen(request, timeout=60)  # pylint: disable=consider-using-with
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:
      return open(os.devnull, "rb"), None, offset  # pylint: disable=consider-using-with
    raise
  if response.status == 206:
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return response, int(total) if total.isdigit() else None, offset
  length = response.headers.get("Content-Length")
  return response, int(length) if length and length.isdigit() else None, 0


def _progress(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
  """A byte-count progress bar on stderr (rate and ETA); a silent one if not ``enabled``."""
  return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, disable=not enabled)


def fetch(url: str, path: str, *, progress: bool = True) -> str:
  """Downloads ``url`` into ``path``, resuming after the bytes already there (use a ``.part``
  name: the file is complete only when this returns). Returns ``path``.

  Raises:
    DownloadError: the transfer failed or ended early (``path`` is kept for the next attempt).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  offset = os.path.getsize(path) if os.path.exists(path) else 0
  try:
    stream, total, start = _open_from(url, offset)
    with stream, open(path, "r+b" if os.path.exists(path) else "wb") as out:
      out.seek(start)
      out.truncate()
      with _progress(total, start, os.path.basename(path), progress) as bar:
        while chunk := stream.read(_CHUNK):
          out.write(chunk)
          bar.update(len(chunk))
  except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
    done = os.path.getsize(path) if os.path.exists(path) else 0
    raise DownloadError(f"downloading {url} failed after {done} bytes ({e}); rerun to resume "
                        f"from {path}") from e
  got = os.path.getsize(path)
  if total is not None and got != total:
    raise DownloadError(f"{url}: got {got} of {total} bytes; rerun to resume from {path}")
  return path


def file_digests(path: str, algorithms: Sequence[str] = ("sha256",)) -> dict[str, str]:
  """Hex digests of the file at ``path``, e.g. ``{"sha256": "..."}``."""
  hashes = {a: hashlib.new(a) for a in algorithms}
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      for h in hashes.values():
        h.update(chunk)
  return {a: h.hexdigest() for a, h in hashes.items()}


def verify(path: str, *, sha256: str | None = None, md5: str | None = None,
           size: int | None = None) -> dict[str, str]:
  """Checks the file's size and digests against the given ones (None: not checked).

  Returns the SHA-256 (and MD5 if checked) digests. Raises ChecksumError naming the file,
  the expected and the actual value, after deleting the file.
  """
  algorithms = ["sha256"] + (["md5"] if md5 else [])
  actual = file_digests(path, algorithms)
  problems = []
  if size is not None and os.path.getsize(path) != size:
    problems.append(f"size {os.path.getsize(path)} bytes, expected {size}")
  for name, expected in (("sha256", sha256), ("md5", md5)):
    if expected and actual[name] != expected.lower():
      problems.append(f"{name} {actual[name]}, expected {expected.lower()}")
  if problems:
    os.remove(path)
    raise ChecksumError(f"{path}: {'; '.join(problems)}. The file has been deleted; rerun "
                        "to download it again (or check --url).")
  return actual


# ------------------------------------------------------------------------------- unpacking


def member_target(name: str, source: Source) -> str | None:
  """Where archive member ``name`` goes, relative to DEST (None: skipped).

  Strips ``source.strip`` components from the front, drops members under ``source.skip``.
  Raises UnsafeArchiveError for an absolute name or one with ``..``.
  """
  clean = posixpath.normpath(name.replace("\\", "/"))
  parts = clean.split("/")
  if clean.startswith("/") or ".." in parts:
    raise UnsafeArchiveError(f"archive member {name!r} would be written outside DEST")
  while parts and parts[0] in source.strip:
    parts = parts[1:]
  if not parts or parts == ["."]:
    return None
  target = "/".join(parts)
  if any((target + "/").startswith(s) for s in source.skip):
    return None
  return target


class _CountingReader:
  """A read-only file wrapper reporting every read's size to ``on_read``."""

  def __init__(self, f: BinaryIO, on_read: Callable[[int], object]):
    self._f, self._on_read = f, on_read

  def read(self, n: int = -1) -> bytes:
    data = self._f.read(n)
    self._on_read(len(data))
    return data


def unpack(archive: str, dest: str, source: Source, folders: Sequence[str], *,
           progress: bool = True) -> None:
  """Unpacks the members of ``archive`` (tar.gz) under the top-level ``folders`` into
  ``dest``; each folder is assembled in ``dest/.unpacking`` and then moved into place.
  The first member mapped to a path wins (the LRA release holds ``listops-1000`` twice).

  Raises:
    UnsafeArchiveError: a member escapes ``dest``, or a folder is not in the archive.
  """
  staging = os.path.join(dest, _UNPACKING)
  shutil.rmtree(staging, ignore_errors=True)
  wanted = set(folders)
  written: set[str] = set()
  with open(archive, "rb") as raw, \
      _progress(os.path.getsize(archive), 0, f"unpacking {os.path.basename(archive)}",
                progress) as bar:
    with tarfile.open(fileobj=_CountingReader(raw, bar.update), mode="r|gz") as tar:
      for member in tar:
        target = member_target(member.name, source)
        if target is None or target.split("/")[0] not in wanted or target in written:
          continue
        out = os.path.join(staging, *target.split("/"))
        if member.isdir():
          os.makedirs(out, exist_ok=True)
        elif member.isfile():
          os.makedirs(os.path.dirname(out), exist_ok=True)
          with tar.extractfile(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
          written.add(target)
  missing = sorted(f for f in wanted if not os.path.isdir(os.path.join(staging, f)))
  if missing:
    shutil.rmtree(staging, ignore_errors=True)
    raise UnsafeArchiveError(f"{archive} has no folder {missing} (after removing the prefixes "
                             f"{list(source.strip)}); is it the {source.name} archive?")
  for folder in folders:
    shutil.rmtree(os.path.join(dest, folder), ignore_errors=True)
    os.replace(os.path.join(staging, folder), os.path.join(dest, folder))
  shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------- task level


def download_task(task: str, dest: str, *, resolutions: Sequence[int] = (32,),
                  url: str | None = None, sha256: str | None = None,
                  progress: bool = True) -> str:
  """Makes ``dest`` a ``data_dir`` for ``task``: fetches (or reuses) the archive in
  ``dest/downloads``, verifies it and unpacks the missing folders. Returns ``dest``.

  ``url`` replaces the public URL (a mirror, or a ``file://`` copy); ``sha256`` replaces the
  published checksums (which still apply to a mirror when it is not given).
  """
  source, folders = task_folders(task, resolutions)
  todo = [f for f in folders if not os.path.isdir(os.path.join(dest, f))]
  if not todo:
    return dest
  archive = os.path.join(dest, DOWNLOADS, source.filename)
  if not os.path.exists(archive):  # only a verified download gets this name
    part = fetch(url or source.url, archive + ".part", progress=progress)
    checks = (dict(sha256=sha256) if sha256 else
              dict(sha256=source.sha256, md5=source.md5, size=source.size))
    digests = verify(part, **checks)
    if not any(checks.values()):
      print(f"{source.filename}: no published checksum; its sha256 is {digests['sha256']}",
            file=sys.stderr)
    os.replace(part, archive)
  unpack(archive, dest, source, todo, progress=progress)
  return dest


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m lra_benchmarks.data.download",
      description="Download and unpack an LRA task's public data into DEST "
      "(then pass --config.data_dir=DEST to the trainer).")
  parser.add_argument("--task", required=True,
                      choices=("listops", "text", "retrieval", "image", "pathfinder"))
  parser.add_argument("--dest", required=True, help="data folder (created if missing)")
  parser.add_argument("--resolutions", default="32",
                      help="pathfinder: comma-separated image sides to unpack, of "
                      f"{PATHFINDER_RESOLUTIONS} (Path-X: 128)")
  parser.add_argument("--url", default=None, help="download from here instead (mirror, file://)")
  parser.add_argument("--sha256", default=None, help="expected SHA-256 of the archive")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  try:
    resolutions = tuple(int(r) for r in args.resolutions.split(","))
  except ValueError:
    parser.error(f"--resolutions must be comma-separated integers, got {args.resolutions!r}")
  try:
    dest = download_task(args.task, args.dest, resolutions=resolutions, url=args.url,
                         sha256=args.sha256, progress=not args.quiet)
  except (DownloadError, ChecksumError, UnsafeArchiveError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.task}: data ready in {dest}; train with --config.data_dir={dest}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
