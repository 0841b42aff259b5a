"""The image cache: every listed image decoded and resized once, in ArrayRecord shards.

    python -m murajax.data.cache build --root /data/MURA-v1.1 --out /data/mura-cache-320 \
        --image_size 320 [--resize stretch|pad] [--num_workers N]

``--root`` may also be a CheXpert folder (``CheXpert-v1.0-small``, holding train.csv and
valid.csv; ``murajax.data.chexpert``): its records hold the 14 observations as ``labels`` (1.0,
0.0, -1.0 uncertain, null blank) and ``sex``, ``age``, ``view``, ``projection`` in place of
MURA's ``label`` and ``study_type``, and the manifest says ``dataset: chexpert``. Runs read only
MURA caches today (a CheXpert cache is refused, naming why): the CheXpert task that will train
on one is a later issue.

then train (with its validation), ``--mode=evaluate``, ``audit`` and ``relabel`` read pixels from
it with ``--config.data.cache=/data/mura-cache-320``, and need nothing else: the cache holds
copies of the CSVs. ``--mode=predict`` with that field and no ``--input`` predicts the cached
images of ``config.eval.split`` (``split_for_prediction``; it needs neither the CSVs nor the
original images: CAM overlays are drawn on the cached image).

This module owns the cache's format, its build and reading pixels from it. The index of a run
comes from the CSVs at ``config.data.root`` or, with that field empty, from the cache's copies
of them (``csv_copies``; labels, ``data.labels_csv``, subsets work the same; the cache's keys
stand for the image files); the cache replaces decoding and resizing: ``CachedPixels`` maps
each index image to its record by its key, the image's path relative to the MURA-v1.1 folder
(``train/XR_WRIST/patient00001/study1_positive/image1.png``).

Format (``FORMAT``, version ``VERSION``): shards ``images-SSSSS-of-NNNNN.array_record`` (written
by ``array_record``, read with ``grain.sources.ArrayRecordDataSource``; one record per group so
that reads are random access; uncompressed, as reading is then 3.5x cheaper) holding the images
of ``train_image_paths.csv`` then ``valid_image_paths.csv`` in row order, ``records_per_shard``
a shard. A record is
``MAGIC``, a little-endian uint32 header length, a JSON header (``key``, ``csv_path`` as the CSV
spells it, ``study``, ``label``, ``study_type``, ``width`` and ``height`` of the original,
``shape`` of the pixels, ``error``: why an unreadable image has no pixels, else null) and the
uint8 pixels, ``[S, S]`` for a grayscale image and ``[S, S, 3]`` for a colour one, exactly
``images.transform(images.decode(path), S, resize)`` (no pickle anywhere). ``csv/`` (``CSV_DIR``)
holds byte-for-byte copies of the four source CSVs (``CSV_FILES``; their ``csv_digest`` is the
manifest's). ``manifest.json``, written last, holds the settings (``dataset``: 'mura' or
'chexpert'; a cache without the field is MURA's), the counts, the keys in record order, the
shards and ``root_name`` (the name of the folder built from, as the CSVs may spell it).

Interrupting: ``build.json`` (the settings) is written before any shard and a rerun with other
settings into the same folder is refused; each shard is written under a temporary name and
renamed when complete, so a rerun writes only the missing shards (and CSV copies), and the
result is byte for byte that of an uninterrupted build (the records and their order depend on
the CSVs only). A rerun deletes the temporary files a killed build left: run one build per
folder at a time. A rerun on a complete cache built before caches held the CSV copies adds them
(from CSVs with the manifest's ``csv_digest`` only).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import pathlib
import struct
import sys
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging

from murajax.data import chexpert, mura
from murajax.data import images as images_lib
from murajax.errors import UserError

FORMAT = "murajax-image-cache"
VERSION = 2  # 2: resized by OpenCV's warp (images.transform), within a grey level of 1's PIL
MANIFEST = "manifest.json"
BUILD = "build.json"
CSV_DIR = "csv"  # the copies of the source CSVs
CSV_FILES = tuple(f"{split}_{kind}.csv" for split in ("train", "valid")
                  for kind in ("image_paths", "labeled_studies"))
MAGIC = b"MJC1"
SPLITS = ("train", "valid")
RECORDS_PER_SHARD = 512
# Uncompressed: reading a 320 px record took 0.05 ms of CPU against 0.18 ms with zstd level 1
# (1.6x the bytes; synthetic images, 2-core machine shared with other jobs, 2026-12-01).
_WRITER_OPTIONS = "group_size:1,uncompressed"
_logged: set[str] = set()


def record_key(record: mura.ImageRecord) -> str:
    """The key of an index image in the cache: its path relative to the MURA-v1.1 folder."""
    return f"{record.study}/{os.path.basename(record.path)}"


def csv_digest(root, csv_files: Sequence[str] = CSV_FILES) -> str:
    """sha256 of the source CSVs (MURA's {train,valid}_{image_paths,labeled_studies}.csv, or
    the ``csv_files`` given)."""
    root = pathlib.Path(root)
    digest = hashlib.sha256()
    for name in csv_files:
        path = root / name
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


def build_command(root, out, image_size, resize) -> str:
    return (f"python -m murajax.data.cache build --root {root or '<MURA-v1.1 folder>'} "
            f"--out {out} --image_size {image_size} --resize {resize}")


# ------------------------------------------------------------------------------------------
# Records.


def encode_record(header: dict, pixels: np.ndarray | None) -> bytes:
    header = dict(header, shape=None if pixels is None else list(pixels.shape))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = b"" if pixels is None else np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return MAGIC + struct.pack("<I", len(text)) + text + body


def decode_record(data: bytes) -> tuple[dict, np.ndarray | None]:
    """(header, uint8 pixels or None for an image that could not be read)."""
    if data[:4] != MAGIC:
        raise ValueError("not a murajax image-cache record")
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + length])
    if header["shape"] is None:
        return header, None
    pixels = np.frombuffer(data, dtype=np.uint8, offset=8 + length)
    return header, pixels.reshape(header["shape"])


def record_pixels(data: bytes, image_size: int) -> np.ndarray | None:
    """A record's uint8 pixels without parsing its JSON header (a fifth of a read's CPU): a
    cache's images are ``image_size`` squared, grey or colour by the number of pixel bytes;
    None for a record without pixels (an image unreadable at build time)."""
    if data[:4] != MAGIC:
        raise ValueError("not a murajax image-cache record")
    (length,) = struct.unpack_from("<I", data, 4)
    offset = 8 + length
    count, plane = len(data) - offset, image_size * image_size
    if count == 0:
        return None
    if count not in (plane, 3 * plane):
        raise ValueError(f"a record with {count} pixel bytes in a cache of {image_size} px")
    shape = (image_size, image_size) if count == plane else (image_size, image_size, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _encode_items(items) -> list[bytes]:
    return [_encode_item(item) for item in items]


def _encoded_in_order(items, pool, num_workers: int, chunk: int = 4):
    """``map(_encode_item, items)``, computed by ``pool`` (or here when it is None) with at
    most 4 chunks per worker in flight, so memory stays bounded if writing falls behind."""
    if pool is None:
        yield from map(_encode_item, items)
        return
    pending = collections.deque()
    for start in range(0, len(items), chunk):
        pending.append(pool.submit(_encode_items, items[start:start + chunk]))
        if len(pending) >= 4 * num_workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _encode_item(item) -> bytes:
    """One listed image -> its record (runs in the build's worker processes)."""
    header, path, image_size, resize = item
    try:
        image = images_lib.decode(path)
    except UserError as e:
        return encode_record(dict(header, width=None, height=None,
                                  error=images_lib.without_training_advice(e)), None)
    pixels = np.asarray(images_lib.transform(image, image_size, resize), dtype=np.uint8)
    return encode_record(dict(header, width=image.width, height=image.height, error=None),
                         pixels)


# ------------------------------------------------------------------------------------------
# Building.


def _shard_name(shard: int, num_shards: int) -> str:
    return f"images-{shard:05d}-of-{num_shards:05d}.array_record"


def _listed_mura_images(root: pathlib.Path, on_missing: str) -> list[dict]:
    """The headers of every image MURA's split CSVs list, train then valid, in row order."""
    headers = []
    for split in SPLITS:
        spelling = {}
        for _, fields in mura.read_csv_rows(root / f"{split}_image_paths.csv"):
            rel = mura.relative_path(fields[0], root) if fields else None
            if rel is not None:
                spelling.setdefault(rel, fields[0])
        index = mura.read_split(root, split, on_missing=on_missing)
        for r in index.images:
            key = record_key(r)
            headers.append({"key": key, "csv_path": spelling.get(key, key), "study": r.study,
                            "label": r.label, "study_type": r.study_type, "path": r.path})
    return headers


def _listed_chexpert_images(root: pathlib.Path, on_missing: str) -> list[dict]:
    """The headers of every image CheXpert's train.csv then valid.csv list, in row order: the
    14 observations as ``labels`` (1.0, 0.0, -1.0 uncertain, null blank), sex, age, view and
    projection as the CSV has them."""
    headers = []
    for split in chexpert.SPLITS:
        images, skipped = chexpert.read_split(root, split, on_missing=on_missing)
        if skipped:
            logging.warning("%s.csv: %d listed image(s) missing, left out (on_missing=skip).",
                            split, skipped)
        headers += [{"key": i.key, "csv_path": i.csv_path, "study": i.study,
                     "labels": list(i.labels), "sex": i.sex, "age": i.age, "view": i.view,
                     "projection": i.projection, "path": i.path} for i in images]
    return headers


@dataclasses.dataclass(frozen=True)
class _Dataset:
    """What a build needs of a dataset: its name (the manifest's ``dataset``) and how messages
    spell it, its split CSVs (digested and copied) and the headers of the images they list."""

    name: str
    title: str
    csv_files: tuple[str, ...]
    listed_images: Callable[[pathlib.Path, str], list[dict]]


DATASETS = {"mura": _Dataset("mura", "MURA", CSV_FILES, _listed_mura_images),
            "chexpert": _Dataset("chexpert", "CheXpert", chexpert.CSV_FILES,
                                 _listed_chexpert_images)}


def _title(name: str) -> str:
    return DATASETS[name].title if name in DATASETS else name


def _dataset_and_root(root) -> tuple[_Dataset, pathlib.Path]:
    """The dataset of ``--root`` and its folder: a CheXpert folder (holding train.csv), or one
    holding a ``CheXpert-v1.0*`` folder; else a MURA-v1.1 folder (``mura.resolve_root``, whose
    errors name the fix)."""
    if root is not None and str(root) != "":
        path = _folder(root)
        for candidate in (path, *sorted(path.glob("CheXpert-v1.0*"))):
            if chexpert.is_folder(candidate):
                return DATASETS["chexpert"], candidate
    return DATASETS["mura"], mura.resolve_root(root)


def _folder(path) -> pathlib.Path:
    """A folder given on the command line or in the config, ``~`` expanded, absolute."""
    return pathlib.Path(os.path.expanduser(str(path))).absolute()


def _write_json_atomically(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_same_csvs(root: pathlib.Path, out: pathlib.Path, digest: str, recorded,
                     csv_files: Sequence[str] = CSV_FILES) -> None:
    """UserError if ``out``'s cache was built from other CSVs than those at ``root``."""
    if recorded != digest:
        raise UserError(
            f"--root {root}: its CSVs ({', '.join(csv_files)}) differ from those the cache in "
            f"--out {out} was built from (csv_digest {digest[:12]}... here, "
            f"{str(recorded)[:12]}... there). Point --root at the folder the cache was built "
            "from, or build into another --out folder.")


def _copy_csvs(root: pathlib.Path, folder: pathlib.Path,
               csv_files: Sequence[str] = CSV_FILES) -> None:
    """Copies the source CSVs byte for byte into ``folder`` (each written under a temporary
    name, then renamed), so that a run needs no ``config.data.root``."""
    folder.mkdir(exist_ok=True)
    for name in csv_files:
        data, final = (root / name).read_bytes(), folder / name
        if final.is_file() and final.read_bytes() == data:
            continue
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


class _Progress:
    """A one-line progress bar with the rate and ETA on stderr."""

    def __init__(self, total: int, done_before: int, stream=None):
        self.total, self.done = total, done_before
        self._first = done_before
        self._start = self._last = time.monotonic()
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= (0.5 if self._tty else 10.0) or self.done == self.total:
            self._last = now
            self._print(now)

    def _print(self, now) -> None:
        rate = (self.done - self._first) / max(now - self._start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if np.isfinite(eta) else "?"
        line = (f"cache: {self.done}/{self.total} images "
                f"({100.0 * self.done / max(self.total, 1):.1f}%), {rate:.0f} images/s, "
                f"ETA {eta_text}")
        end = "\n" if not self._tty or self.done == self.total else ""
        self._stream.write(("\r" if self._tty else "") + line + end)
        self._stream.flush()


def build(root, out, *, image_size: int, resize: str = "stretch", num_workers: int = 0,
          records_per_shard: int = RECORDS_PER_SHARD, on_missing: str = "error",
          progress_stream=None) -> dict:
    """Builds (or finishes building) the cache of the MURA-v1.1 folder ``root`` in ``out``;
    returns the manifest. See the module docstring for the format and the interrupt rules."""
    from array_record.python.array_record_module import ArrayRecordWriter

    image_size = images_lib.check_image_size(image_size)
    resize = images_lib.check_resize(resize)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"--num_workers must be an integer >= 0, got {num_workers!r}")
    if records_per_shard < 1:
        raise UserError(f"--records_per_shard must be >= 1, got {records_per_shard}")
    dataset, root = _dataset_and_root(root)
    out = _folder(out)
    headers = dataset.listed_images(root, on_missing)
    num_shards = max(1, -(-len(headers) // records_per_shard))
    settings = {"format": FORMAT, "version": VERSION, "dataset": dataset.name,
                "image_size": image_size, "resize": resize,
                "csv_digest": csv_digest(root, dataset.csv_files),
                "records_per_shard": records_per_shard, "num_records": len(headers)}
    out.mkdir(parents=True, exist_ok=True)
    if (out / BUILD).is_file():
        before = json.loads((out / BUILD).read_text())
        before.setdefault("dataset", "mura")  # built before caches held other datasets
        changed = [k for k in settings if before.get(k) != settings[k]]
        _check_same_csvs(root, out, settings["csv_digest"], before.get("csv_digest"),
                         dataset.csv_files)
        if changed:
            raise UserError(
                f"--out {out} holds a cache built with other settings ("
                + "; ".join(f"{k}: {before.get(k)!r} there, {settings[k]!r} now" for k in changed)
                + "). Use another --out folder, or delete that one to rebuild it.")
    else:
        _write_json_atomically(out / BUILD, settings)
    if (out / MANIFEST).is_file():  # complete: a rerun adds what it lacks (the CSV copies)
        _check_same_csvs(root, out, settings["csv_digest"],
                         json.loads((out / MANIFEST).read_text()).get("csv_digest"),
                         dataset.csv_files)
    for stale in [*out.glob("*.tmp-*"), *out.glob(f"{CSV_DIR}/*.tmp-*")]:  # a killed build's
        stale.unlink()

    shards = [_shard_name(i, num_shards) for i in range(num_shards)]
    todo = [i for i, name in enumerate(shards) if not (out / name).is_file()]
    items = [({k: v for k, v in h.items() if k != "path"}, h["path"], image_size, resize)
             for i in todo for h in headers[i * records_per_shard:(i + 1) * records_per_shard]]
    progress = _Progress(len(headers), len(headers) - len(items), progress_stream)
    pool = None
    if num_workers > 0 and items:
        # Spawn (not fork) once JAX is loaded: forking a multithreaded JAX process is unsafe.
        method = "fork" if "jax" not in sys.modules and "fork" in mp.get_all_start_methods() \
            else "spawn"
        pool = concurrent.futures.ProcessPoolExecutor(num_workers,
                                                      mp_context=mp.get_context(method))
    try:
        encoded = _encoded_in_order(items, pool, num_workers)
        for shard in todo:
            count = min(records_per_shard, len(headers) - shard * records_per_shard)
            final = out / shards[shard]
            tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
            writer = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
            for _ in range(count):
                writer.write(next(encoded))
                progress.update()
            writer.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _copy_csvs(root, out / CSV_DIR, dataset.csv_files)
    manifest = dict(settings, splits={s: sum(1 for h in headers if h["key"].startswith(s + "/"))
                                      for s in SPLITS}, root_name=root.name,
                    keys=[h["key"] for h in headers],
                    shards=[{"file": name,
                             "num_records": min(records_per_shard,
                                                len(headers) - i * records_per_shard),
                             "bytes": (out / name).stat().st_size}
                            for i, name in enumerate(shards)])
    _write_json_atomically(out / MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class Wanted:
    """What a reader needs of a cache: its ``image_size`` and ``resize``, and with ``root`` set
    (a MURA-v1.1 folder), that it was built from that root's CSVs."""

    image_size: int
    resize: str
    root: str = ""
    dataset: str = "mura"  # the only one murajax trains on today

    @classmethod
    def of(cls, data_config) -> "Wanted":
        return cls(int(data_config.image_size), str(data_config.resize),
                   str(data_config.root or ""))


def _checked_manifest(directory: pathlib.Path, wanted: Wanted) -> dict:
    """The manifest of the cache in ``directory``, checked against ``wanted``
    (``_check_manifest``); UserError if it is missing, unreadable or does not match."""
    rebuild = build_command(wanted.root, directory, wanted.image_size, wanted.resize)
    if not directory.is_dir():
        raise UserError(f"config.data.cache: {directory} is not a folder. Build the cache "
                        f"first: {rebuild}")
    path = directory / MANIFEST
    if not path.is_file():
        what = ("its build did not finish (build.json without manifest.json): rerun the build, "
                "which finishes what is missing" if (directory / BUILD).is_file()
                else "it is not a murajax image cache (no manifest.json): build one")
        raise UserError(f"config.data.cache: {directory}: {what}: {rebuild}")
    try:
        manifest = json.loads(path.read_text())
        fmt, version = manifest["format"], manifest["version"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"config.data.cache: {path} is not a murajax cache manifest. Rebuild "
                        f"the cache: {rebuild}") from None
    if fmt != FORMAT or version != VERSION:
        raise UserError(f"config.data.cache: {directory} is a {fmt!r} cache of version "
                        f"{version!r}; this murajax reads {FORMAT!r} version {VERSION}. Rebuild "
                        f"it: {rebuild}")
    _check_manifest(manifest, directory, wanted)
    return manifest


def _check_manifest(manifest: dict, directory, wanted: Wanted) -> None:
    """UserError naming the first field where ``manifest`` does not match ``wanted``
    (image_size, resize; the source CSVs' digest when ``wanted.root`` is set)."""
    # Into a new folder: the build refuses to finish one holding other settings.
    rebuild = build_command(wanted.root, "<new folder>", wanted.image_size, wanted.resize)
    dataset = manifest.get("dataset", "mura")
    if dataset != wanted.dataset:
        raise UserError(
            f"config.data.cache: {directory} is an image cache of {_title(dataset)} (built from "
            f"{manifest.get('root_name', '?')}), but this run reads {_title(wanted.dataset)} "
            f"(config.task='mura'); murajax has no {_title(dataset)} task yet to train, "
            f"evaluate or predict on it. Build a cache of the MURA-v1.1 folder: {rebuild}")
    for field in ("image_size", "resize"):
        want = getattr(wanted, field)
        if manifest[field] != want:
            raise UserError(
                f"config.data.cache: {directory} was built with {field}={manifest[field]!r}, "
                f"but config.data.{field} is {want!r}. Set --config.data.{field}="
                f"{manifest[field]}, or build a cache for {field}={want!r}: {rebuild}")
    if wanted.root:
        root = mura.resolve_root(wanted.root)
        if csv_digest(root) != manifest["csv_digest"]:
            raise UserError(
                f"config.data.cache: {directory} was built from other CSVs than those in "
                f"config.data.root ({root}): the csv_digest differs. Rebuild the cache from "
                f"this root: {rebuild}")


def cached_keys(data_config) -> frozenset[str]:
    """The keys (images) of the cache at ``config.data.cache``, checked against
    ``config.data`` (its root's CSVs included)."""
    directory = _folder(data_config.cache)
    return frozenset(_checked_manifest(directory, Wanted.of(data_config))["keys"])


def csv_copies(data_config) -> tuple[pathlib.Path, frozenset[str], str]:
    """The cache at ``config.data.cache`` as a run's CSV source, for an empty
    ``config.data.root``: its copies of the CSVs (checked against the manifest's csv_digest),
    its keys (the images that exist) and the name of the folder it was built from. UserError
    for a cache built before caches held the copies."""
    directory = _folder(data_config.cache)
    manifest = _checked_manifest(directory, Wanted.of(data_config))
    folder = directory / CSV_DIR
    if not all((folder / name).is_file() for name in CSV_FILES):
        raise UserError(
            f"config.data.root is empty and the image cache config.data.cache={directory} has "
            f"no copies of the MURA CSVs ({folder}/; it was built before caches held them). "
            "Set --config.data.root=/path/to/MURA-v1.1, or rerun the build, which adds them: "
            + build_command("", directory, manifest["image_size"], manifest["resize"]))
    if csv_digest(folder) != manifest["csv_digest"]:
        raise UserError(
            f"config.data.cache: the CSV copies in {folder} differ from those {directory} was "
            "built from (the csv_digest differs). Rerun the build from the MURA-v1.1 folder, "
            "which restores them: "
            + build_command("", directory, manifest["image_size"], manifest["resize"]))
    return folder, frozenset(manifest["keys"]), str(manifest.get("root_name", ""))


class CachedPixels:
    """The resized uint8 pixels of an index's images, read from the cache (picklable: the
    shard readers are opened lazily in each process), in ``colour`` mode
    (``images.as_colour``: 'grey' makes every image one plane)."""

    def __init__(self, directory: pathlib.Path, shards: Sequence[str], records: np.ndarray,
                 paths: Sequence[str], image_size: int, colour: str = "keep"):
        self.directory = str(directory)
        self.image_size = int(image_size)
        self.colour = images_lib.check_colour(colour)
        self.shards = [str(directory / name) for name in shards]
        self.records = np.asarray(records, dtype=np.int64)  # index position -> record number
        self.paths = list(paths)
        self._source = None

    def __getstate__(self):
        return dict(self.__dict__, _source=None)

    def _read(self, pos: int) -> bytes:
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.shards)
        return self._source[int(self.records[pos])]

    def pixels(self, pos: int) -> np.ndarray:
        """uint8 [S, S] (grayscale) or [S, S, 3] (colour, with ``colour='keep'``); UserError for
        an image unreadable at build time."""
        return images_lib.as_colour(self._stored(pos), self.colour)

    def _stored(self, pos: int) -> np.ndarray:
        data = self._read(pos)
        pixels = record_pixels(data, self.image_size)
        if pixels is None:
            header, _ = decode_record(data)
            raise UserError(
                f"{header['error']} (recorded in the image cache {self.directory}). Replace it "
                "and rebuild the cache, remove it from the CSV, or set "
                "--config.data.on_bad_image=skip to skip unreadable images.")
        return pixels

    def image(self, pos: int, *, flip: bool = False, angle: float = 0.0):
        """The cached image, flipped and rotated as ``images.transform`` does (identity
        resize: it is already ``S`` x ``S``); the uint8 array itself when neither applies."""
        if not flip and not angle:
            return self.pixels(pos)
        pixels = self._stored(pos)  # as colour last, as the image files' path has it
        image = images_lib.transform(pixels, pixels.shape[0], "stretch", flip=flip,
                                     angle=angle)
        return images_lib.as_colour(image, self.colour)


def pixels_for_index(index: mura.MuraIndex, data_config) -> CachedPixels:
    """The cache at ``config.data.cache``, checked against ``config.data``, mapped onto
    ``index``'s images. UserError if it is missing, does not match or lacks an image."""
    directory = _folder(data_config.cache)
    manifest = _checked_manifest(directory, Wanted.of(data_config))
    number = {key: i for i, key in enumerate(manifest["keys"])}
    keys = [record_key(r) for r in index.images]
    missing = [k for k in keys if k not in number]
    if missing:
        raise UserError(
            f"config.data.cache: {len(missing)} image(s) of this run are not in the cache "
            f"{directory}, e.g. {missing[0]} (the cache holds the images of the split CSVs; "
            "images of config.data.unlabeled_csv are not cached). Leave config.data.cache empty"
            " to decode the images, or rebuild the cache: "
            + build_command(data_config.root, directory, data_config.image_size,
                            data_config.resize))
    if str(directory) not in _logged:
        _logged.add(str(directory))
        logging.info("Reading pixels from the image cache %s (%d images at %d px, resize=%s).",
                     directory, manifest["num_records"], manifest["image_size"],
                     manifest["resize"])
    return CachedPixels(directory, [s["file"] for s in manifest["shards"]],
                        np.asarray([number[k] for k in keys], dtype=np.int64),
                        [r.path for r in index.images], manifest["image_size"],
                        images_lib.colour_from(data_config))


PREDICT_SPLITS = SPLITS + ("all",)


def split_for_prediction(directory, split: str, *, image_size: int, resize: str,
                         colour: str = "keep") -> tuple[CachedPixels, list[str]]:
    """``--mode=predict`` on a cache: the cached images of ``split`` ('train', 'valid' or
    'all') as a pixel source, and their keys (``record_key``), in record order. Needs no CSVs:
    only the run's ``image_size`` and ``resize``, which the cache must have been built with."""
    if split not in PREDICT_SPLITS:
        raise UserError(f"config.eval.split={split!r}: predicting from a cache takes one of "
                        f"{', '.join(PREDICT_SPLITS)}")
    directory = _folder(directory)
    # No root: the CSVs are not read.
    manifest = _checked_manifest(directory, Wanted(int(image_size), str(resize)))
    numbers = [i for i, key in enumerate(manifest["keys"])
               if split == "all" or key.startswith(split + "/")]
    if not numbers:
        raise UserError(f"config.data.cache: {directory} holds no images of the {split!r} split "
                        f"(it holds {manifest['splits']})")
    keys = [manifest["keys"][i] for i in numbers]
    pixels = CachedPixels(directory, [s["file"] for s in manifest["shards"]], numbers, keys,
                          manifest["image_size"], colour)
    return pixels, keys


# ------------------------------------------------------------------------------------------
# Command line.


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus if cpus > 1 else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m murajax.data.cache",
        description="Decode and resize every listed image once into an ArrayRecord cache "
                    "(train with --config.data.cache=<out>).")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build the cache (a rerun finishes what is missing)")
    b.add_argument("--root", required=True,
                   help="the MURA-v1.1 folder, or a CheXpert-v1.0(-small) folder")
    b.add_argument("--out", required=True, help="the cache folder")
    b.add_argument("--image_size", type=int, required=True, help="config.data.image_size")
    b.add_argument("--resize", default="stretch", choices=images_lib.RESIZE_MODES,
                   help="config.data.resize")
    b.add_argument("--num_workers", type=int, default=None,
                   help="decoding processes (default: one per available CPU; 0: in-process)")
    b.add_argument("--records_per_shard", type=int, default=RECORDS_PER_SHARD)
    b.add_argument("--on_missing", default="error", choices=mura.ON_MISSING,
                   help="an image the CSV lists but the folder lacks: refuse, or leave it out")
    args = parser.parse_args(argv)
    workers = _default_workers() if args.num_workers is None else args.num_workers
    try:
        manifest = build(args.root, args.out, image_size=args.image_size, resize=args.resize,
                         num_workers=workers, records_per_shard=args.records_per_shard,
                         on_missing=args.on_missing)
    except UserError as e:
        print(f"murajax.data.cache: error: {e}", file=sys.stderr, flush=True)
        return 2
    out = pathlib.Path(args.out).absolute()
    use = (f"train with --config.data.cache={out}" if manifest["dataset"] == "mura" else
           f"a {_title(manifest['dataset'])} cache: no murajax task reads it yet")
    print(f"cache: {manifest['num_records']} images ({manifest['splits']}) in "
          f"{len(manifest['shards'])} shard(s) at {out}; {use}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
