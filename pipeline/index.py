"""Nearest-neighbour search over the memory bank, behind a small faiss wrapper.

Saved as ``index.faiss`` (``faiss.write_index``) plus ``index.json``; no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np


class NNIndex:
    """Exact (``flat``) or approximate (``ivfpq``) L2 search.

    Args:
        kind: ``"flat"`` for exact ``IndexFlatL2``; ``"ivfpq"`` for ``IndexIVFPQ`` on banks
            too large for exhaustive search.
        nprobe: inverted lists visited per query (``ivfpq`` only).
    """

    def __init__(self, kind: str = "flat", *, nprobe: int = 16) -> None:
        if kind not in ("flat", "ivfpq"):
            raise ValueError(f"index kind must be 'flat' or 'ivfpq', got {kind!r}")
        self.kind = kind
        self.nprobe = nprobe
        self.index_: faiss.Index | None = None

    def fit(self, bank: np.ndarray) -> NNIndex:
        """Index ``bank``: ``(M, D)`` float32."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        m, dim = bank.shape
        if self.kind == "flat":
            index: faiss.Index = faiss.IndexFlatL2(dim)
        else:
            nlist = max(1, min(4096, int(4 * np.sqrt(m))))
            sub = next(s for s in (16, 8, 4, 2, 1) if dim % s == 0)
            index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, sub, 8)
            if m < 256 * 39:
                raise ValueError(f"ivfpq needs at least {256 * 39} bank vectors to train, got {m}")
            index.train(bank)
            index.nprobe = self.nprobe
        index.add(bank)
        self.index_ = index
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` nearest bank vectors of each query.

        Args:
            queries: ``(Q, D)`` float32.

        Returns:
            ``(Q, k)`` squared L2 distances (float32, ascending) and ``(Q, k)`` int64 indices.
        """
        if self.index_ is None:
            raise RuntimeError("NNIndex.search called before fit or load")
        k = min(k, self.index_.ntotal)
        dist, idx = self.index_.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.maximum(dist, 0.0), idx

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``index.faiss`` and ``index.json`` into ``directory``; returns their paths."""
        if self.index_ is None:
            raise RuntimeError("NNIndex.save called before fit")
        directory = Path(directory)
        faiss.write_index(self.index_, str(directory / "index.faiss"))
        meta = {"kind": self.kind, "nprobe": self.nprobe, "ntotal": int(self.index_.ntotal)}
        (directory / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
        return [directory / "index.faiss", directory / "index.json"]

    @classmethod
    def load(cls, directory: str | Path) -> NNIndex:
        """Read an index written by :meth:`save`."""
        directory = Path(directory)
        meta = json.loads((directory / "index.json").read_text())
        self = cls(meta["kind"], nprobe=int(meta["nprobe"]))
        self.index_ = faiss.read_index(str(directory / "index.faiss"))
        if self.kind == "ivfpq":
            self.index_.nprobe = self.nprobe
        if int(self.index_.ntotal) != int(meta["ntotal"]):
            raise ValueError(f"{directory}: index holds {self.index_.ntotal} vectors, json says {meta['ntotal']}")
        return self

    @property
    def ntotal(self) -> int:
        return 0 if self.index_ is None else int(self.index_.ntotal)
