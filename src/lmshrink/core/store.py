"""The results store: one SQLite file (Python's ``sqlite3``) holding sweep runs, their metrics and per-layer
sensitivities. Every write is one transaction, so a process killed mid-write leaves the file as it was before that
write (SQLite's journal rolls the unfinished transaction back when the file is next opened).

Schema (``SCHEMA_VERSION`` in table ``meta``):

``runs``: one row per run of a recipe on a model (a sweep's unit of work)
    id INTEGER PRIMARY KEY; key TEXT UNIQUE (digest of model, recipe, seed and protocol: the same work has the same
    key, so a sweep never runs it twice); model TEXT; name TEXT (the recipe's label); kind TEXT (preset, plan,
    recipe, dense); recipe TEXT (the recipe as JSON); seed INTEGER; protocol TEXT (JSON: calibration and
    evaluation options); status TEXT (pending, running, done, failed); worker TEXT; started REAL, finished REAL
    (Unix seconds); record TEXT (JSON: the compress, evaluate and bench records); error TEXT.
``metrics``: one row per number a run measured
    run_id INTEGER REFERENCES runs(id); name TEXT (e.g. ppl.wikitext2, ppl.enwiki-sample, kl, stored_bytes,
    decode_tokens_per_s, compress_seconds); value REAL; PRIMARY KEY (run_id, name).
``sensitivity``: one row per layer and option
    study TEXT (digest of model, calibration and option template); layer TEXT; option TEXT; out_features,
    in_features INTEGER; proxy REAL (the output error the option adds, ``methods.plan.proxy``); proxy_seconds
    REAL; kl REAL (measured KL of the whole model with only this layer changed, when measured); PRIMARY KEY
    (study, layer, option).
``studies``: one row per sensitivity study
    study TEXT PRIMARY KEY; model TEXT; record TEXT (JSON: model, calibration, template, options, timings).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, model TEXT NOT NULL, name TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'recipe', recipe TEXT, seed INTEGER, protocol TEXT,
    status TEXT NOT NULL DEFAULT 'pending', worker TEXT, started REAL, finished REAL, record TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS studies (study TEXT PRIMARY KEY, model TEXT NOT NULL, record TEXT);
CREATE TABLE IF NOT EXISTS sensitivity (
    study TEXT NOT NULL, layer TEXT NOT NULL, option TEXT NOT NULL, out_features INTEGER, in_features INTEGER,
    proxy REAL, proxy_seconds REAL, kl REAL, PRIMARY KEY (study, layer, option));
"""


class Store:
    """A results store file (created with its schema when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed transaction survives a crash of the machine too
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self):
        """``with store.transaction(): ...``: the statements inside commit together or not at all."""
        return _Transaction(self.db)

    # -- runs ------------------------------------------------------------------------------------------------------
    def add_run(self, key: str, model: str, name: str, kind: str, recipe: Any, seed: int | None,
                protocol: dict) -> int:
        """The run's id; a run with this key is added as pending unless it exists (then it is left as it is)."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO runs (key, model, name, kind, recipe, seed, protocol) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (key, model, name, kind, json.dumps(recipe), seed, json.dumps(protocol, sort_keys=True)))
            return int(self.db.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()[0])

    def claim_run(self, run_id: int, worker: str) -> bool:
        """Mark a run that is not done as running by ``worker``; False when it is already done."""
        with self.transaction():
            cursor = self.db.execute("UPDATE runs SET status = 'running', worker = ?, started = ?, error = NULL "
                                     "WHERE id = ? AND status != 'done'", (worker, time.time(), run_id))
            return cursor.rowcount == 1

    def finish_run(self, run_id: int, record: dict, metrics: dict[str, float | None]) -> None:
        """Store a run's record and metrics and mark it done, in one transaction."""
        with self.transaction():
            self.db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            self.db.executemany("INSERT INTO metrics (run_id, name, value) VALUES (?, ?, ?)",
                                [(run_id, k, None if v is None else float(v)) for k, v in metrics.items()])
            self.db.execute("UPDATE runs SET status = 'done', finished = ?, record = ?, error = NULL WHERE id = ?",
                            (time.time(), json.dumps(record, default=str), run_id))

    def fail_run(self, run_id: int, error: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE runs SET status = 'failed', finished = ?, error = ? WHERE id = ?",
                            (time.time(), error[-4000:], run_id))

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY id"
        rows = [dict(r) for r in self.db.execute(query, (status,) if status else ())]
        metrics: dict[int, dict[str, float]] = {}
        for run_id, name, value in self.db.execute("SELECT run_id, name, value FROM metrics"):
            metrics.setdefault(run_id, {})[name] = value
        for row in rows:
            row["metrics"] = metrics.get(row["id"], {})
            for field in ("recipe", "protocol", "record"):
                row[field] = json.loads(row[field]) if row[field] else None
        return rows

    # -- sensitivity -----------------------------------------------------------------------------------------------
    def add_study(self, study: str, model: str, record: dict) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO studies (study, model, record) VALUES (?, ?, ?) ON CONFLICT(study) DO "
                            "UPDATE SET record = excluded.record", (study, model, json.dumps(record, default=str)))

    def study(self, study: str) -> dict | None:
        row = self.db.execute("SELECT record FROM studies WHERE study = ?", (study,)).fetchone()
        return None if row is None else json.loads(row[0])

    def studies(self) -> list[dict[str, Any]]:
        return [{"study": r[0], "model": r[1], "record": json.loads(r[2]) if r[2] else None}
                for r in self.db.execute("SELECT study, model, record FROM studies ORDER BY rowid")]

    def put_sensitivity(self, study: str, rows: Iterable[dict[str, Any]]) -> None:
        """Rows of one layer (or more), in one transaction; a measured ``kl`` already stored is kept."""
        with self.transaction():
            for r in rows:
                self.db.execute(
                    "INSERT INTO sensitivity (study, layer, option, out_features, in_features, proxy, proxy_seconds, "
                    "kl) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(study, layer, option) DO UPDATE SET "
                    "proxy = coalesce(excluded.proxy, proxy), proxy_seconds = coalesce(excluded.proxy_seconds, "
                    "proxy_seconds), kl = coalesce(excluded.kl, kl)",
                    (study, r["layer"], r["option"], r.get("out_features"), r.get("in_features"), r.get("proxy"),
                     r.get("proxy_seconds"), r.get("kl")))

    def sensitivity(self, study: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM sensitivity WHERE study = ? ORDER BY rowid",
                                                 (study,))]


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
