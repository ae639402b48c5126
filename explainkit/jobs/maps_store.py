"""The maps store: ``maps.zarr`` in the output folder of an explain run with ``save_maps``.

One zarr group, written incrementally in chunks of ``chunk`` rows (the batch size), rows in scan
order:

* ``maps/<method>``: float16 ``(N, H, W)``, one array per method;
* ``predictions`` (int64), ``labels`` (int64), ``probabilities`` (float32, of the prediction): ``(N,)``;
* ``checksums``: uint32 ``(num_chunks,)``: the CRC-32 of each chunk's rows as written;
* ``done``: uint8 ``(num_chunks,)``, one zarr chunk per element, set after a chunk's rows and
  checksum are written. ``resume`` recomputes exactly the chunks not marked done, so a run killed
  at any point (SIGKILL included) continues without redoing finished work, and first re-reads every
  finished chunk: one whose files were damaged on disk (unreadable, or not matching its checksum)
  is recomputed, not trusted.

A write that fails (a full disk: ``ENOSPC``; any ``OSError``) is a one-line
:class:`~explainkit.errors.ExplainkitError` that says to free space and ``--resume``; the chunk
being written stays pending.

Under ``torchrun`` chunk ``c`` belongs to rank ``c % world_size``: every image is explained once,
with no padding, and ranks write disjoint zarr chunks concurrently (each zarr chunk is its own
file). Memory stays flat in the dataset size: a rank holds one batch at a time.

Read it back with :func:`load_maps` (arrays load lazily; ``numpy.asarray``, dask and xarray read
them).
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from explainkit.errors import ExplainkitError

STORE_NAME = "maps.zarr"
FORMAT_VERSION = 2  # 2: per-chunk checksums
ROW_ARRAYS = ("predictions", "labels", "probabilities")


def _zarr():
    import zarr  # imported on use: only save_maps and torchrun runs need it

    return zarr


@dataclass
class MapsStore:
    path: Path
    group: Any
    rows: int
    chunk: int
    methods: list[str]

    @classmethod
    def create(
        cls, path: Path, rows: int, chunk: int, methods: list[str], map_size: tuple[int, int], fingerprint: dict
    ) -> "MapsStore":
        """A new, empty store at ``path`` (an existing one is replaced)."""
        zarr = _zarr()
        if path.exists():
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w")
        chunks = max(1, (rows + chunk - 1) // chunk)
        group.attrs.update(
            format_version=FORMAT_VERSION,
            rows=rows,
            chunk=chunk,
            methods=methods,
            map_size=list(map_size),
            fingerprint=fingerprint,
        )
        maps = group.require_group("maps")
        for name in methods:
            maps.create_array(name, shape=(rows, *map_size), chunks=(chunk, *map_size), dtype="float16", fill_value=0)
        group.create_array("predictions", shape=(rows,), chunks=(chunk,), dtype="int64", fill_value=-1)
        group.create_array("labels", shape=(rows,), chunks=(chunk,), dtype="int64", fill_value=-1)
        group.create_array("probabilities", shape=(rows,), chunks=(chunk,), dtype="float32", fill_value=0)
        group.create_array("checksums", shape=(chunks,), chunks=(1,), dtype="uint32", fill_value=0)
        group.create_array("done", shape=(chunks,), chunks=(1,), dtype="uint8", fill_value=0)
        return cls(path, group, rows, chunk, list(methods))

    @classmethod
    def open(cls, path: Path, fingerprint: dict | None = None) -> "MapsStore":
        """An existing store; with ``fingerprint``, refuse one made with other settings."""
        zarr = _zarr()
        try:
            group = zarr.open_group(str(path), mode="r+")
            attrs = dict(group.attrs)
            rows, chunk, methods = int(attrs["rows"]), int(attrs["chunk"]), list(attrs["methods"])
        except Exception as exc:
            raise ExplainkitError(
                f"cannot open the maps store {path} ({type(exc).__name__}); run again with resume=False"
            ) from None
        if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
            saved = attrs.get("fingerprint") or {}
            differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise ExplainkitError(
                f"cannot resume: {path} was made with other settings ({', '.join(differ)}); run again with resume=False"
            )
        return cls(path, group, rows, chunk, methods)

    @property
    def num_chunks(self) -> int:
        return int(self.group["done"].shape[0])

    def chunk_indices(self, chunk: int) -> list[int]:
        return list(range(chunk * self.chunk, min((chunk + 1) * self.chunk, self.rows)))

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's chunks not yet marked done, in order."""
        done = np.asarray(self.group["done"][:])
        return [c for c in range(rank, self.num_chunks, world_size) if not done[c]]

    def write_chunk(
        self,
        chunk: int,
        predictions: torch.Tensor,
        labels: torch.Tensor,
        probabilities: torch.Tensor,
        maps: Mapping[str, torch.Tensor],
    ) -> None:
        """Write one chunk's rows and checksum, then mark it done (so a kill or a failed write
        mid-chunk leaves it pending)."""
        rows = slice(chunk * self.chunk, min((chunk + 1) * self.chunk, self.rows))
        arrays = {f"maps/{name}": maps[name].detach().to(torch.float16).cpu().numpy() for name in self.methods}
        arrays["predictions"] = predictions.cpu().numpy().astype(np.int64)
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
        arrays["probabilities"] = probabilities.float().cpu().numpy()
        try:
            for key, values in arrays.items():
                self.group[key][rows] = values
            self.group["checksums"][chunk] = _checksum(arrays)
            self.group["done"][chunk] = 1
        except OSError as error:  # a full disk (ENOSPC), a vanished mount, a read-only file system
            raise ExplainkitError(
                f"writing chunk {chunk} of {self.path} failed ({error.strerror or error}); "
                "free space or fix the disk, then run again with --resume (finished chunks are kept)"
            ) from None

    def damaged(self) -> list[int]:
        """Finished chunks whose rows no longer read back as written: unreadable files, or rows that
        do not match the chunk's checksum. (Stores from before checksums cannot be checked: none.)"""
        if "checksums" not in self.group:
            return []
        done = np.asarray(self.group["done"][:])
        checksums = np.asarray(self.group["checksums"][:])
        bad = []
        for chunk in np.flatnonzero(done).tolist():
            rows = slice(chunk * self.chunk, min((chunk + 1) * self.chunk, self.rows))
            try:
                arrays = {f"maps/{name}": np.asarray(self.group["maps"][name][rows]) for name in self.methods}
                arrays.update({key: np.asarray(self.group[key][rows]) for key in ROW_ARRAYS})
            except Exception:  # noqa: BLE001 - any decode failure of a damaged chunk file
                bad.append(chunk)
                continue
            if _checksum(arrays) != int(checksums[chunk]):
                bad.append(chunk)
        return bad

    def recompute(self, chunks: list[int]) -> None:
        """Mark ``chunks`` pending again."""
        for chunk in chunks:
            self.group["done"][chunk] = 0

    def complete(self) -> bool:
        return bool(np.asarray(self.group["done"][:]).all())

    def results(self) -> dict[str, torch.Tensor]:
        """Predictions, labels and probabilities of every row (small: the maps stay on disk)."""
        return {key: torch.from_numpy(np.asarray(self.group[key][:])) for key in ("predictions", "labels", "probabilities")}


def _checksum(arrays: Mapping[str, np.ndarray]) -> int:
    """CRC-32 over a chunk's arrays, in a fixed order of names."""
    value = 0
    for key in sorted(arrays):
        value = zlib.crc32(np.ascontiguousarray(arrays[key]).tobytes(), value)
    return value


def load_maps(out_dir: str | Path) -> dict[str, Any]:
    """Method name -> lazily read ``(N, H, W)`` float16 array of an explain run with ``save_maps``.

    Example:
        >>> maps = explainkit.load_maps("outputs")
        >>> maps["gradcam"][:8]          # numpy (8, 32, 32), read from disk on indexing
    """
    path = Path(out_dir) / STORE_NAME
    if not path.is_dir():
        raise ExplainkitError(f"no {STORE_NAME} in {out_dir}; run explain with save_maps=True")
    store = MapsStore.open(path)
    if not store.complete():
        raise ExplainkitError(f"{path} is incomplete (a run stopped mid-way); continue it with resume=True")
    return {name: store.group["maps"][name] for name in store.methods}


def load_results(out_dir: str | Path) -> dict[str, np.ndarray]:
    """Predictions, labels and probabilities (numpy) of an explain run with ``save_maps``."""
    store = MapsStore.open(Path(out_dir) / STORE_NAME)
    return {key: value.numpy() for key, value in store.results().items()}
