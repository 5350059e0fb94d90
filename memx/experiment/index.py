"""The sweep's run index: one SQLite row per run (status, config hash, times, summary, error).

Every update is a single transaction, so an interrupted sweep leaves rows that are either
before or after an update, never torn; a row left "running" is simply retried next time.
"""

import json
import pathlib
import sqlite3
import time

from memx.errors import UserError

SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
  name TEXT PRIMARY KEY, config_hash TEXT, status TEXT NOT NULL, started REAL, ended REAL,
  summary TEXT, error TEXT)"""
STATUSES = ("pending", "running", "done", "failed")


class RunIndex:
  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
    try:
      self._conn.execute(SCHEMA)
      # A `runs` table of another schema (another tool's file) fails here, not mid-sweep.
      self._conn.execute("SELECT name, config_hash, status, started, ended, summary, error "
                         "FROM runs LIMIT 0")
    except sqlite3.DatabaseError as e:
      self._conn.close()
      raise UserError(f"the sweep's run index {self.path} cannot be used ({e}). Restore it "
                      "from a copy, or move it aside: the next sweep then starts every run "
                      "over (the run directories are replaced).") from None

  def _tx(self, sql: str, args: tuple) -> None:
    with self._conn:
      self._conn.execute("BEGIN IMMEDIATE")
      self._conn.execute(sql, args)
      self._conn.execute("COMMIT")

  def register(self, name: str, config_hash: str) -> None:
    """Adds a pending row (keeps an existing one): row order is sweep order."""
    self._tx("INSERT OR IGNORE INTO runs(name, config_hash, status) VALUES (?, ?, 'pending')",
             (name, config_hash))

  def mark_running(self, name: str, config_hash: str) -> None:
    # A summary of an earlier run (another config, or the same one before a restart) does not
    # describe this one.
    self._tx("UPDATE runs SET status='running', config_hash=?, started=?, ended=NULL, "
             "error=NULL, summary=NULL WHERE name=?", (config_hash, time.time(), name))

  def mark_done(self, name: str, summary: dict) -> None:
    self._tx("UPDATE runs SET status='done', ended=?, summary=?, error=NULL WHERE name=?",
             (time.time(), json.dumps(summary, default=str), name))

  def mark_failed(self, name: str, error: str) -> None:
    self._tx("UPDATE runs SET status='failed', ended=? , error=? WHERE name=?",
             (time.time(), error, name))

  def get(self, name: str) -> dict | None:
    rows = self.rows(name)
    return rows[0] if rows else None

  def rows(self, name: str | None = None) -> list[dict]:
    sql = "SELECT name, config_hash, status, started, ended, summary, error FROM runs"
    cur = self._conn.execute(sql + (" WHERE name=?" if name else "") + " ORDER BY rowid",
                             (name,) if name else ())
    cols = [c[0] for c in cur.description]
    out = []
    for r in cur.fetchall():
      row = dict(zip(cols, r, strict=True))
      row["summary"] = json.loads(row["summary"]) if row["summary"] else None
      out.append(row)
    return out

  def close(self) -> None:
    self._conn.close()
