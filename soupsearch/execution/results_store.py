"""On-disk results store: shard counts by (recipe key, split, shard bounds).

A SQLite file in the run directory, written only by the driver. Entries are keyed
additionally by fingerprints of the ingredient stack and of each split's data, so a
changed sweep or dataset never reuses stale numbers. Re-running an interrupted search
re-evaluates nothing that finished.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from soupsearch.evaluation.metrics import Counts

# Bump when the meaning of a recipe or of a shard's counts changes (mixing, metrics,
# input preparation): results stored by an older version are then not reused.
# 4: merge methods as per-tensor kernels (DARE masks seeded per tensor name).
EVAL_SEMANTICS_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_results (
    stack_fp TEXT NOT NULL, split_fp TEXT NOT NULL, recipe_key TEXT NOT NULL,
    split TEXT NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL,
    counts TEXT NOT NULL, node_id TEXT, pid INTEGER,
    created REAL DEFAULT (julianday('now')),
    PRIMARY KEY (stack_fp, split_fp, recipe_key, start, stop)
);
CREATE TABLE IF NOT EXISTS correct (
    stack_fp TEXT NOT NULL, split_fp TEXT NOT NULL, recipe_key TEXT NOT NULL,
    n INTEGER NOT NULL, bits BLOB NOT NULL,
    PRIMARY KEY (stack_fp, split_fp, recipe_key)
);
"""


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class ResultStore:
    def __init__(self, path: str | Path, stack_fp: str, split_fps: dict[str, str]):
        stack_fp = f"{stack_fp}-v{EVAL_SEMANTICS_VERSION}"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._open()
        except sqlite3.DatabaseError as e:  # a cache: a corrupt one is set aside and rebuilt
            import sys
            import time

            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.replace(Path(str(aside) + suffix))
            print(f"[soupsearch] warning: results cache {self.path} is unreadable ({e}); moved to {aside.name}, "
                  "starting an empty one (its shards are evaluated again)", file=sys.stderr, flush=True)
            self.conn = self._open()
        self.stack_fp = stack_fp
        self.split_fps = split_fps

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute("SELECT COUNT(*) FROM shard_results").fetchone()
            conn.execute("PRAGMA quick_check").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def load(self, recipe_key: str, split: str, start: int, stop: int) -> Counts | None:
        row = self.conn.execute(
            "SELECT counts FROM shard_results WHERE stack_fp=? AND split_fp=? AND recipe_key=? AND start=? AND stop=?",
            (self.stack_fp, self.split_fps[split], recipe_key, start, stop),
        ).fetchone()
        return Counts.from_dict(json.loads(row[0])) if row else None

    def save(self, recipe_key: str, split: str, start: int, stop: int, counts: Counts, node_id: str, pid: int):
        self.conn.execute(
            "INSERT OR REPLACE INTO shard_results (stack_fp, split_fp, recipe_key, split, start, stop, counts, node_id, pid)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (self.stack_fp, self.split_fps[split], recipe_key, split, start, stop,
             json.dumps(counts.to_dict()), node_id, pid),
        )

    def save_correct(self, recipe_key: str, split: str, correct: np.ndarray) -> None:
        """Per-example correctness of a recipe on a split (for paired comparisons), bit-packed."""
        c = np.asarray(correct, bool)
        self.conn.execute("INSERT OR REPLACE INTO correct (stack_fp, split_fp, recipe_key, n, bits) VALUES (?,?,?,?,?)",
                          (self.stack_fp, self.split_fps[split], recipe_key, int(c.size), np.packbits(c).tobytes()))

    def load_correct(self, recipe_key: str, split: str) -> np.ndarray | None:
        row = self.conn.execute("SELECT n, bits FROM correct WHERE stack_fp=? AND split_fp=? AND recipe_key=?",
                                (self.stack_fp, self.split_fps[split], recipe_key)).fetchone()
        if row is None:
            return None
        return np.unpackbits(np.frombuffer(row[1], np.uint8), count=int(row[0])).astype(bool)

    def count(self) -> int:
        return self.conn.execute(
            "SELECT COUNT(*) FROM shard_results WHERE stack_fp=?", (self.stack_fp,)
        ).fetchone()[0]

    def node_ids(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT node_id FROM shard_results WHERE stack_fp=?", (self.stack_fp,)
        ).fetchall()
        return sorted(r[0] for r in rows if r[0])

    def close(self):
        self.conn.close()
