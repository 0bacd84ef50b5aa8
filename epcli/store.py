"""The artifact store: one SQLite file (through sqlite-utils) plus content-addressed files.

Layout of a store folder (default `store/`, or `--store DIR`, or `$EPCLI_STORE`):

    epcli.db                       runs, artifacts, lineage, metrics, checks (WAL mode)
    artifacts/ab/abcdef....ext     files named by their sha256, written to a temp file and renamed
    cache/                         decoded datasets (safe to delete)

Every run is a row in `runs`, opened as "running" and closed as finished / failed / interrupted. A run
that died without closing (killed process) is marked interrupted the next time the store opens.
See docs/store.md for the schema and example queries with the `sqlite-utils` CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlite_utils
from sqlite_utils.migrations import Migrations

from epcli.atomic import pid_alive
from epcli.errors import NotFoundError, StoreError, UsageError

DB_NAME = "epcli.db"
SCHEMA_VERSION = 2
RUN_KINDS = ("train", "attack", "corrupt", "report")
STATUSES = ("running", "finished", "failed", "interrupted")
FACETS = ("dataset", "split", "model", "attack", "norm", "eps", "grad_mode", "corruption", "severity",
          "n_examples")

# The first schema's leaderboard view (one correlated subquery per column: quadratic in the runs, replaced by
# migration m002). Kept as data so that old stores migrate and bench/bench_store.py can time it.
LEADERBOARD_V1 = """
        SELECT t.id AS model_run_id, t.model, t.dataset,
          (SELECT value FROM metrics WHERE run_id = t.id AND name = 'test_acc'
             ORDER BY step DESC LIMIT 1) AS clean_acc,
          (SELECT MIN(value) FROM results WHERE model_run_id = t.id AND name = 'robust_acc'
             AND attack = 'pgd' AND norm = 'linf' AND ABS(eps - 8.0/255) < 1e-4) AS pgd_linf_8_255,
          (SELECT MIN(value) FROM results WHERE model_run_id = t.id AND name = 'robust_acc'
             AND attack = 'pgd' AND norm = 'l2' AND ABS(eps - 0.5) < 1e-3) AS pgd_l2_0_5,
          (SELECT MIN(value) FROM results WHERE model_run_id = t.id AND name = 'robust_acc'
             AND attack = 'autoattack' AND norm = 'linf' AND ABS(eps - 8.0/255) < 1e-4) AS autoattack_linf_8_255,
          (SELECT MIN(value) FROM results WHERE model_run_id = t.id AND name = 'robust_acc'
             AND attack = 'square' AND norm = 'linf' AND ABS(eps - 8.0/255) < 1e-4) AS square_linf_8_255,
          (SELECT value FROM results WHERE model_run_id = t.id AND name = 'corruption_mean_acc'
             ORDER BY started_at DESC LIMIT 1) AS corruption_mean_acc,
          (SELECT COUNT(*) FROM results WHERE model_run_id = t.id AND unreliable = 1) AS unreliable_results
        FROM runs t WHERE t.kind = 'train' AND t.status = 'finished'"""

migrations = Migrations("epcli")


def default_root() -> Path:
    return Path(os.environ.get("EPCLI_STORE") or "store")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_run_id() -> str:
    """16 characters: 10 of millisecond timestamp (so ids sort by time) + 6 random."""
    t = int(time.time() * 1000)
    head = "".join(_B32[(t >> (5 * i)) & 31] for i in reversed(range(10)))
    return head + "".join(secrets.choice(_B32) for _ in range(6))


def canonical_json(obj: Any) -> str:
    """Sorted-key compact JSON that is always valid JSON: NaN and infinities become null, since a single
    NaN in a JSON column breaks `json_extract` over the whole table."""
    return json.dumps(finite_json(obj), sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with `text` literally (use with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


# --- schema ---------------------------------------------------------------------------------------------

@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["runs"].create({
        "id": str, "kind": str, "status": str, "error": str, "argv": str, "config": str,
        "config_sha256": str, "seed": int, "model": str, "dataset": str, "model_run_id": str,
        "epcli_version": str, "torch_version": str, "cuda_version": str, "host": str, "pid": int,
        "device": str, "git_commit": str, "started_at": str, "ended_at": str, "summary": str,
    }, pk="id", not_null={"kind", "status", "started_at"})
    db["runs"].create_index(["kind", "model", "dataset", "status"])
    db["artifacts"].create({
        "sha256": str, "path": str, "size": int, "kind": str, "run_id": str, "created_at": str,
        "meta": str,
    }, pk="sha256", foreign_keys=[("run_id", "runs", "id")])
    db["run_artifacts"].create({
        "run_id": str, "sha256": str, "role": str, "name": str,
    }, pk=("run_id", "sha256", "role"), foreign_keys=[("run_id", "runs", "id"), ("sha256", "artifacts")])
    db["run_artifacts"].create_index(["sha256"])
    db["metrics"].create({
        "id": int, "run_id": str, "name": str, "value": float, "step": int, "dataset": str, "split": str,
        "model": str, "attack": str, "norm": str, "eps": float, "grad_mode": str, "corruption": str,
        "severity": int, "n_examples": int, "unreliable": int, "detail": str, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "runs", "id")])
    db["metrics"].create_index(["run_id"])
    db["metrics"].create_index(["name", "attack", "norm", "eps"])
    db["checks"].create({
        "id": int, "run_id": str, "name": str, "passed": int, "detail": str,
    }, pk="id", foreign_keys=[("run_id", "runs", "id")])
    db["schema_version"].create({"version": int, "applied_at": str}, pk="version")
    db.execute("""CREATE VIEW lineage AS
        SELECT ra.run_id, r.kind AS run_kind, ra.role, ra.name, a.sha256, a.kind AS artifact_kind,
               a.path, a.run_id AS produced_by, p.kind AS producer_kind
        FROM run_artifacts ra JOIN artifacts a ON a.sha256 = ra.sha256
        JOIN runs r ON r.id = ra.run_id LEFT JOIN runs p ON p.id = a.run_id""")
    db.execute("""CREATE VIEW results AS
        SELECT m.*, r.kind AS run_kind, r.status AS run_status, r.model_run_id, r.started_at
        FROM metrics m JOIN runs r ON r.id = m.run_id""")
    # One row per trained model: the headline numbers of the study. Full detail: the `results` view.
    db.execute("CREATE VIEW leaderboard AS " + LEADERBOARD_V1)


@migrations()
def m002_linear_leaderboard(db: sqlite_utils.Database) -> None:
    """The leaderboard as one grouped pass over metrics (m001's per-row subqueries grew quadratically)."""
    db["runs"].create_index(["model_run_id", "kind"], if_not_exists=True)
    db["metrics"].create_index(["run_id", "name", "step"], if_not_exists=True)
    db["checks"].create_index(["run_id"], if_not_exists=True)
    db.execute("DROP VIEW IF EXISTS leaderboard")
    db.execute(LEADERBOARD_SQL)


# One row per finished training run: the headline numbers of the study (the worst value over all runs for
# each robust cell). Full detail: the `results` view.
LEADERBOARD_SQL = """CREATE VIEW leaderboard AS
    WITH per_model AS (
      SELECT r.model_run_id AS mid,
        MIN(CASE WHEN m.name = 'robust_acc' AND m.attack = 'pgd' AND m.norm = 'linf'
                  AND ABS(m.eps - 8.0/255) < 1e-4 THEN m.value END) AS pgd_linf_8_255,
        MIN(CASE WHEN m.name = 'robust_acc' AND m.attack = 'pgd' AND m.norm = 'l2'
                  AND ABS(m.eps - 0.5) < 1e-3 THEN m.value END) AS pgd_l2_0_5,
        MIN(CASE WHEN m.name = 'robust_acc' AND m.attack = 'autoattack' AND m.norm = 'linf'
                  AND ABS(m.eps - 8.0/255) < 1e-4 THEN m.value END) AS autoattack_linf_8_255,
        MIN(CASE WHEN m.name = 'robust_acc' AND m.attack = 'square' AND m.norm = 'linf'
                  AND ABS(m.eps - 8.0/255) < 1e-4 THEN m.value END) AS square_linf_8_255,
        SUM(CASE WHEN m.unreliable = 1 THEN 1 ELSE 0 END) AS unreliable_results
      FROM metrics m JOIN runs r ON r.id = m.run_id
      WHERE r.model_run_id IS NOT NULL
      GROUP BY r.model_run_id),
    clean AS (  -- the test accuracy of the last epoch (SQLite: a bare column comes from the MAX row)
      SELECT run_id, value, MAX(step) AS last_step
      FROM metrics WHERE name = 'test_acc' GROUP BY run_id),
    corr AS (  -- the newest corruption run's mean accuracy
      SELECT r.model_run_id AS mid, m.value, MAX(r.started_at) AS newest
      FROM metrics m JOIN runs r ON r.id = m.run_id WHERE m.name = 'corruption_mean_acc'
      GROUP BY r.model_run_id)
    SELECT t.id AS model_run_id, t.model, t.dataset, clean.value AS clean_acc, p.pgd_linf_8_255,
           p.pgd_l2_0_5, p.autoattack_linf_8_255, p.square_linf_8_255, corr.value AS corruption_mean_acc,
           COALESCE(p.unreliable_results, 0) AS unreliable_results
    FROM runs t
    LEFT JOIN per_model p ON p.mid = t.id
    LEFT JOIN clean ON clean.run_id = t.id
    LEFT JOIN corr ON corr.mid = t.id
    WHERE t.kind = 'train' AND t.status = 'finished'"""

# What an epcli store holds: a database with other tables, or a `runs` table without these columns, is
# someone else's file and is never written to.
EPCLI_TABLES = {"runs", "artifacts", "run_artifacts", "metrics", "checks", "schema_version",
                "_sqlite_migrations", "sqlite_sequence", "sqlite_stat1", "sqlite_stat4"}
RUNS_COLUMNS = {"id", "kind", "status", "config", "started_at", "model_run_id"}


@migrations()
def m003_tags_and_notes(db: sqlite_utils.Database) -> None:
    """Run management after the fact: free-form tags (JSON list) and a note per run."""
    have = set(db["runs"].columns_dict)
    for col in ("tags", "note"):
        if col not in have:  # idempotent: a store may already have them from a development build
            db["runs"].add_column(col, str)


MIGRATION_COUNT = len(migrations._migrations)


# --- the store ------------------------------------------------------------------------------------------

class Store:
    """An epcli store folder. Opening it creates or upgrades the schema; every method is one transaction.

    `create=False` (commands that only read) refuses a folder without a store instead of creating one.
    A store the process cannot write (read-only folder or file, or `readonly=True`) opens read-only:
    reading works, any write is a StoreError.
    """

    def __init__(self, root: str | os.PathLike | None = None, create: bool = True,
                 readonly: bool | None = None):
        self.root = Path(root) if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is a file, not a store folder (give the folder that holds "
                             f"{DB_NAME})")
        self.path = self.root / DB_NAME
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if not create and not exists:
            raise StoreError(f"no epcli store at {self.root} (commands that write - train, attack, corrupt, "
                             "demo - create one; check --store / $EPCLI_STORE)")
        if readonly is None:
            readonly = exists and not (os.access(self.root, os.W_OK) and os.access(self.path, os.W_OK))
        self.readonly = bool(readonly)
        self.created = not exists and not self.readonly
        if exists:
            self._inspect()  # before anything is written: refuse foreign or damaged files untouched
        if not self.readonly:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if not os.access(self.root, os.W_OK):
                    raise PermissionError(f"no write permission on {self.root}")
            except OSError as e:
                raise StoreError(f"cannot create or write the store folder {self.root}: "
                                 f"{e.strerror or e}") from None
        self.artifacts_dir = self.root / "artifacts"
        self.cache_dir = self.root / "cache"
        if create and not self.readonly:  # before a command that writes does any work (was exit 1 at its first write)
            for sub in (self.artifacts_dir, self.cache_dir, self.root / "tmp"):
                if sub.exists() and not sub.is_dir():
                    raise StoreError(f"{sub} is a file, not a folder: the store {self.root} is damaged (move the "
                                     "file away)")
        self.db = self._open_readonly() if self.readonly else self._open()

    # connection and schema
    def _inspect(self) -> None:
        """Look at an existing database through a read-only connection; refuse it unless it is an epcli
        store this epcli can read. Nothing is written (no WAL switch, no migrations table)."""
        try:
            conn = self._connect_readonly(isolation_level="")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a readable SQLite database ({e}); it was left untouched") \
                from None
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            runs_cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")} if "runs" in tables else set()
            version = 0
            if "schema_version" in tables:
                version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a readable SQLite database ({e}); it was left untouched") \
                from None
        finally:
            conn.close()
        foreign = sorted(tables - EPCLI_TABLES)
        if foreign or ("runs" in tables and not RUNS_COLUMNS <= runs_cols) or \
                (tables and "runs" not in tables and tables - {"_sqlite_migrations"}):
            shown = foreign or sorted(tables)
            raise StoreError(f"{self.path} is a SQLite database but not an epcli store (tables: "
                             f"{', '.join(shown[:5])}); it was left untouched")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}, newer than this epcli "
                             f"({SCHEMA_VERSION}); upgrade epcli")

    def _open_readonly(self) -> sqlite_utils.Database:
        return sqlite_utils.Database(self._connect_readonly(isolation_level=None))

    def _connect_readonly(self, **kwargs) -> sqlite3.Connection:
        """A read-only connection. A WAL database in a folder we cannot write (a shared or read-only mount)
        cannot be read that way, since SQLite cannot create its -shm file: then the file is read as it is
        (nobody can be writing it). _inspect needs this as much as the commands do (it refused such a store as
        "not a readable SQLite database (attempt to write a readonly database)", exit 5, for every command)."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False, **kwargs)
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.DatabaseError:
            conn.close()
            return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False, **kwargs)

    def _open(self) -> sqlite_utils.Database:
        try:
            conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a readable SQLite database ({e}); it was left untouched") \
                from None
        # Migrate under a file lock, so that a second process never sees a half-created schema.
        with self._lock():
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA foreign_keys = ON")
                db = sqlite_utils.Database(conn)
                if len(migrations.applied(db)) < MIGRATION_COUNT:
                    migrations.apply(db)
                    db["schema_version"].upsert({"version": SCHEMA_VERSION, "applied_at": now()}, pk="version")
                version = max((r["version"] for r in db["schema_version"].rows), default=0)
            except sqlite3.DatabaseError as e:
                conn.close()
                raise StoreError(f"cannot use the store {self.path}: {e}") from None
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{self.path} has schema version {version}, newer than this epcli "
                             f"({SCHEMA_VERSION}); upgrade epcli")
        self._mark_stale(db)
        return db

    @contextlib.contextmanager
    def write_transaction(self, dry_run: bool = False) -> Iterator[None]:
        """One transaction that takes the write lock first (BEGIN IMMEDIATE): the busy timeout then applies.
        A deferred transaction whose first statement reads (sqlite-utils checks the table) fails at once with
        "database is locked" when another process wrote in between. `dry_run` rolls back instead of committing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.conn.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("ROLLBACK" if dry_run else "COMMIT")

    MANAGED = ("artifacts", "tmp", "cache", "partial")  # folders whose every file epcli accounts for

    def refuse_inside(self, path: str | os.PathLike, option: str) -> None:
        """A folder the user names for output (`report --out`, `corrupt --export`) must lie outside the folders
        the store manages: there the files would have no row (check_invariants fails, `gc` deletes them), be
        cleared by the next command (tmp/, partial/) or mix with a cache. Was accepted, exit 0."""
        target = Path(path).resolve()
        for name in self.MANAGED:
            managed = (self.root / name).resolve()
            if target == managed or managed in target.parents:
                raise UsageError(f"{option} {path} is inside the store's {name}/ folder, whose files epcli manages "
                                 f"(gc removes those it has no row for): choose a folder outside it")

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store {self.root} is read-only here (no write permission); commands that "
                             "only read (runs, show, report, trace, compare) work on it")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        try:
            f = open(self.root / ".lock", "a")
        except OSError as e:  # a folder named .lock, say: was IsADirectoryError, exit 1, for every command
            raise StoreError(f"cannot open the store's lock file {self.root / '.lock'}: {e.strerror or e}") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _mark_stale(self, db: sqlite_utils.Database) -> None:
        """Runs left 'running' by a process on this host that no longer exists were interrupted."""
        host = socket.gethostname()
        for r in db.query("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", [host]):
            if r["pid"] and not pid_alive(r["pid"]):
                db.execute("UPDATE runs SET status = 'interrupted', ended_at = ?, error = ? "
                           "WHERE id = ? AND status = 'running'",
                           [now(), "process ended without closing the run", r["id"]])
                self._clean_after(db, r["id"])

    def _clean_after(self, db: sqlite_utils.Database, run_id: str) -> None:
        """A killed run's temp files, and an artifact file renamed into place whose row was never added."""
        tmp_dir = self.root / "tmp"
        for intent in sorted(tmp_dir.glob(f"{run_id}-*.intent")):
            sha = intent.read_text().strip()
            if sha and not list(db.query("SELECT 1 FROM artifacts WHERE sha256 = ?", [sha])):
                for f in (self.artifacts_dir / sha[:2]).glob(f"{sha}*"):
                    f.unlink(missing_ok=True)
        for f in tmp_dir.glob(f"{run_id}-*"):
            f.unlink(missing_ok=True)

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # runs
    def start_run(self, kind: str, config: dict, *, argv: list[str] | None = None, seed: int | None = None,
                  model: str | None = None, dataset: str | None = None, model_run_id: str | None = None,
                  device: str | None = None) -> str:
        if kind not in RUN_KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        self._writable()
        run_id = new_run_id()
        row = {
            "id": run_id, "kind": kind, "status": "running", "error": None,
            "argv": json.dumps(argv if argv is not None else sys.argv),
            "config": canonical_json(config), "config_sha256": config_hash(config), "seed": seed,
            "model": model, "dataset": dataset,
            "model_run_id": model_run_id if kind != "train" else run_id,
            "host": socket.gethostname(), "pid": os.getpid(), "device": device,
            "started_at": now(), "ended_at": None, "summary": None, **environment(),
        }
        self.db["runs"].insert(row)
        return run_id

    def update_run(self, run_id: str, **fields) -> None:
        if "summary" in fields and not isinstance(fields["summary"], (str, type(None))):
            fields["summary"] = canonical_json(fields["summary"])
        self.db["runs"].update(run_id, fields)

    def finish_run(self, run_id: str, status: str = "finished", error: str | None = None,
                   summary: dict | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        fields = {"status": status, "error": error, "ended_at": now()}
        if summary is not None:
            fields["summary"] = canonical_json(summary)
        self.db["runs"].update(run_id, fields)

    @contextlib.contextmanager
    def run(self, kind: str, config: dict, **kwargs) -> Iterator[str]:
        """Open a run; close it as finished, failed (with the error text) or interrupted (Ctrl-C, SIGTERM)."""
        run_id = self.start_run(kind, config, **kwargs)
        try:
            yield run_id
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM in the CLI (errors.Terminated)
            self.finish_run(run_id, "interrupted", str(e) or "interrupted by the user (Ctrl-C)")
            self._clean_after_stop(run_id)
            raise
        except BaseException as e:
            self.finish_run(run_id, "failed", f"{type(e).__name__}: {e}".strip())
            self._clean_after_stop(run_id)
            raise
        else:
            if self.get_run(run_id)["status"] == "running":
                self.finish_run(run_id, "finished")

    def _clean_after_stop(self, run_id: str) -> None:
        """A run stopped by an exception (a signal may land between an artifact's rename and its row): its temp
        files and row-less artifact files go now, as a killed run's do when the store next opens."""
        with contextlib.suppress(OSError, sqlite3.Error):
            self._clean_after(self.db, run_id)

    def get_run(self, run_id: str) -> dict:
        """A run by id or by a unique id prefix."""
        if not str(run_id).strip():  # '' is a prefix of every id: it named the whole store as "ambiguous"
            raise UsageError("the run id is empty: give a run id or a unique prefix (see `epcli runs`)")
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ? OR id LIKE ? ESCAPE '\\' ORDER BY id "
                                  "LIMIT 2", [run_id, like_prefix(run_id)]))
        exact = [r for r in rows if r["id"] == run_id]
        if exact:
            return _decode_run(exact[0])
        if len(rows) == 1:
            return _decode_run(rows[0])
        if not rows:
            raise NotFoundError(f"no run {run_id!r} in the store {self.root}")
        raise NotFoundError(f"run id prefix {run_id!r} is ambiguous")

    def runs(self, kind: str | None = None, status: str | None = None, model: str | None = None,
             dataset: str | None = None, model_run_id: str | None = None,
             limit: int | None = None) -> list[dict]:
        if kind is not None and kind not in RUN_KINDS:
            raise UsageError(f"unknown run kind {kind!r}: use {', '.join(RUN_KINDS)}")
        if status is not None and status not in STATUSES:
            raise UsageError(f"unknown status {status!r}: use {', '.join(STATUSES)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise UsageError(f"--limit must be a whole number >= 0 (0: all), got {limit!r}")
        where, args = [], []
        for col, val in (("kind", kind), ("status", status), ("model", model), ("dataset", dataset),
                         ("model_run_id", model_run_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [_decode_run(r) for r in self.db.query(sql, args)]

    def latest_train_run(self, model: str, dataset: str | None = None) -> dict:
        runs = self.runs(kind="train", status="finished", model=model, dataset=dataset, limit=1)
        if not runs:
            where = f" on {dataset}" if dataset else ""
            raise NotFoundError(f"no finished training run of model {model!r}{where} in the store "
                                f"{self.root} (train one with `epcli train --model {model}`)")
        return runs[0]

    # artifacts
    def write_artifact(self, run_id: str, kind: str, write: Callable[[Path], None], *, suffix: str = "",
                       name: str | None = None, meta: dict | None = None) -> str:
        """Call `write(tmp_path)`, hash the file, move it to its content address. Returns the sha256."""
        self._writable()
        tmp_dir = self.root / "tmp"
        token = secrets.token_hex(4)
        tmp = tmp_dir / f"{run_id}-{token}{suffix}"
        intent = tmp_dir / f"{run_id}-{token}.intent"  # names the file being renamed, for crash cleanup
        try:
            tmp_dir.mkdir(exist_ok=True)
            write(tmp)
            sha = _sha256_file(tmp)
            dest = self.artifacts_dir / sha[:2] / f"{sha}{suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            intent.write_text(sha)
            os.replace(tmp, dest)  # atomic; an identical file already there is simply replaced
            size = dest.stat().st_size
        except OSError as e:
            raise StoreError(f"cannot write a {kind} artifact into the store {self.root}: "
                             f"{e.strerror or e}") from None
        except Exception as e:
            if "No space left on device" in str(e):  # safetensors reports a full disk as its own error
                raise StoreError(f"cannot write a {kind} artifact into the store {self.root}: no space left "
                                 "on device") from None
            raise
        finally:
            with contextlib.suppress(OSError):  # an unlink error here would replace the StoreError above
                tmp.unlink(missing_ok=True)
        rel = str(dest.relative_to(self.root))
        with self.write_transaction():  # row and lineage edge together: a kill never leaves an unlinked artifact
            self.db["artifacts"].insert({
                "sha256": sha, "path": rel, "size": size, "kind": kind, "run_id": run_id,
                "created_at": now(), "meta": canonical_json(meta or {}),
            }, ignore=True)
            self.link(run_id, sha, "output", name or kind)
        intent.unlink(missing_ok=True)
        return sha

    def add_file(self, run_id: str, kind: str, src: str | os.PathLike, *, name: str | None = None,
                 meta: dict | None = None) -> str:
        """Copy an existing file into the store as an output of `run_id`."""
        import shutil
        return self.write_artifact(run_id, kind, lambda p: shutil.copyfile(src, p),
                                   suffix="".join(Path(src).suffixes[-1:]), name=name, meta=meta)

    def register_external(self, run_id: str, kind: str, path: str | os.PathLike, role: str = "input",
                          name: str | None = None) -> str:
        """Record a file outside the store (e.g. a checkpoint given by path) by its content hash."""
        p = Path(path).resolve()
        sha = _sha256_file(p)
        self.db["artifacts"].insert({"sha256": sha, "path": str(p), "size": p.stat().st_size, "kind": kind,
                                     "run_id": None, "created_at": now(), "meta": "{}"}, ignore=True)
        self.link(run_id, sha, role, name or kind)
        return sha

    def link(self, run_id: str, sha256: str, role: str, name: str | None = None) -> None:
        self.db["run_artifacts"].insert({"run_id": run_id, "sha256": sha256, "role": role, "name": name},
                                        replace=True)

    def artifact(self, sha256: str) -> dict:
        rows = list(self.db.query("SELECT * FROM artifacts WHERE sha256 = ? OR sha256 LIKE ? ESCAPE '\\' "
                                  "LIMIT 2", [sha256, like_prefix(sha256)]))
        if len(rows) != 1:
            raise NotFoundError(f"no artifact {sha256!r} in the store")
        row = rows[0]
        row["meta"] = json.loads(row["meta"] or "{}")
        return row

    def artifact_path(self, sha256: str) -> Path:
        p = Path(self.artifact(sha256)["path"])
        return p if p.is_absolute() else self.root / p

    def artifacts_of(self, run_id: str, role: str | None = None, kind: str | None = None) -> list[dict]:
        sql = ("SELECT a.*, ra.role, ra.name FROM run_artifacts ra JOIN artifacts a ON a.sha256 = ra.sha256 "
               "WHERE ra.run_id = ?")
        args: list = [run_id]
        if role:
            sql += " AND ra.role = ?"
            args.append(role)
        if kind:
            sql += " AND a.kind = ?"
            args.append(kind)
        rows = list(self.db.query(sql + " ORDER BY a.created_at", args))
        for r in rows:
            r["meta"] = json.loads(r["meta"] or "{}")
        return rows

    def derived_runs(self, run_id: str) -> list[dict]:
        """Runs that read an artifact produced by `run_id`, recursively: the lineage tree as (parent, run)."""
        out, frontier, seen = [], [run_id], {run_id}
        while frontier:
            parent = frontier.pop(0)
            for r in self.db.query(
                    "SELECT DISTINCT ra.run_id FROM run_artifacts ra JOIN artifacts a ON a.sha256 = ra.sha256 "
                    "WHERE a.run_id = ? AND ra.role = 'input' ORDER BY ra.run_id", [parent]):
                if r["run_id"] not in seen:
                    seen.add(r["run_id"])
                    out.append({"parent": parent, **self.get_run(r["run_id"])})
                    frontier.append(r["run_id"])
        return out

    # metrics
    def log_metrics(self, run_id: str, rows: list[dict]) -> None:
        """Insert tidy metric rows: {name, value, step?, <facets>..., unreliable?, detail?}."""
        stamp = now()
        clean = []
        for r in rows:
            row = {"run_id": run_id, "created_at": stamp, **r}
            if isinstance(row.get("detail"), (dict, list)):
                row["detail"] = canonical_json(row["detail"])
            if "unreliable" in row:
                row["unreliable"] = int(bool(row["unreliable"]))
            clean.append(row)
        if clean:
            self.db["metrics"].insert_all(clean, alter=False)

    def log_metric(self, run_id: str, name: str, value: float, **facets) -> None:
        self.log_metrics(run_id, [{"name": name, "value": float(value), **facets}])

    def metrics(self, run_id: str | None = None, **filters) -> list[dict]:
        where, args = [], []
        if run_id:
            where.append("run_id = ?")
            args.append(run_id)
        for k, v in filters.items():
            where.append(f"{k} = ?")
            args.append(v)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return list(self.db.query(sql, args))

    def log_checks(self, run_id: str, checks: list[dict]) -> None:
        self.db["checks"].insert_all([{"run_id": run_id, "name": c["check"], "passed": int(bool(c["passed"])),
                                       "detail": c.get("detail", "")} for c in checks])

    def checks(self, run_id: str) -> list[dict]:
        return list(self.db.query("SELECT * FROM checks WHERE run_id = ? ORDER BY id", [run_id]))


    # run management: find, tag, note, remove, collect garbage
    def find_runs(self, *, kind: str | None = None, status: str | None = None, model: str | None = None,
                  dataset: str | None = None, since: str | None = None, tag: str | None = None,
                  where: list[str] | None = None, sort: str | None = None, limit: int | None = None,
                  unknown: list[str] | None = None) -> list[dict]:
        """Runs matching every filter. `since`: an ISO date/time or an age like 30m, 12h, 7d. `where`:
        conditions NAME OP VALUE (OP one of >=, <=, !=, =, >, <) on a run column (seed, device...), a
        summary or metric value (the run's last value of that metric: test_acc, robust_acc (the worst over
        eps), clean_acc...), or a config key (config.recipe.epochs). `sort`: any such NAME, `-NAME` for
        descending; default newest first. Runs without the NAME never match a condition and sort last.
        `unknown`: a list that receives the NAMEs no run of the selection has (a typo, or runs of another kind)."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise UsageError(f"--limit must be a whole number >= 0 (0: all), got {limit!r}")
        for option, value in (("--model", model), ("--dataset", dataset), ("--tag", tag)):
            if value is not None and not value.strip():  # an empty value matched nothing, silently
                raise UsageError(f"{option} is empty: give a value or leave the option out")
        if sort is not None and not sort.lstrip("-").strip():
            raise UsageError(f"--sort {sort!r} names nothing: give NAME or -NAME, e.g. --sort -test_acc")
        conds = [parse_condition(w) for w in where or []]
        rows = self.runs(kind=kind, status=status, model=model, dataset=dataset)
        if since is not None:
            cutoff = parse_since(since)
            rows = [r for r in rows if (r.get("started_at") or "") >= cutoff]
        if tag:
            rows = [r for r in rows if tag in (r.get("tags") or [])]
        names = {c[0] for c in conds} | ({sort.lstrip("-")} if sort else set())
        for n in sorted(names):  # these never had a value: the condition matched nothing, the sort did nothing
            if n in ("config", "summary", "argv", "tags") or (n.startswith("config.") and not all(n.split(".")[1:])):
                raise UsageError(f"{n!r} is not a value to filter or sort on: name one key, e.g. config.recipe.epochs, "
                                 "test_acc or robust_acc (use --tag for tags)")
        values = {r["id"]: {n: self.run_value(r, n) for n in names} for r in rows} if names else {}
        if unknown is not None and rows:
            unknown.extend(n for n in sorted(names) if all(values[r["id"]][n] is None for r in rows))
        rows = [r for r in rows if all(_compare(values[r["id"]][n], op, v) for n, op, v in conds)]
        if sort:
            key, desc = sort.lstrip("-"), sort.startswith("-")
            have = [r for r in rows if values[r["id"]][key] is not None]
            none = [r for r in rows if values[r["id"]][key] is None]
            have.sort(key=lambda r: _sort_key(values[r["id"]][key]), reverse=desc)
            rows = have + none
        return rows[:limit] if limit else rows

    def run_value(self, run: dict, name: str) -> Any:
        """The value of NAME for a run: a column, config.KEY, a summary scalar, or its last metric value
        (the minimum over eps for robust_acc)."""
        if name in run and name not in ("config", "summary", "argv"):
            return run[name]
        if name.startswith("config."):
            node: Any = run.get("config") or {}
            for part in name.split(".")[1:]:
                node = node.get(part) if isinstance(node, dict) else None
            return node
        summ = run.get("summary") if isinstance(run.get("summary"), dict) else {}
        if isinstance(summ.get(name), (int, float, str)) and not isinstance(summ.get(name), bool):
            return summ[name]
        agg = "MIN(value)" if name == "robust_acc" else "value"
        sql = f"SELECT {agg} AS v FROM metrics WHERE run_id = ? AND name = ?" + \
            ("" if name == "robust_acc" else " ORDER BY step DESC, id DESC LIMIT 1")
        got = list(self.db.query(sql, [run["id"], name]))
        return got[0]["v"] if got else None

    def tag_run(self, run_id: str, add: list[str] = (), remove: list[str] = ()) -> list[str]:
        """Add and remove tags of a run (kept sorted, unique); returns the new tags. A tag is one non-empty
        word: `runs` shows tags space-separated as #tag, and a space inside one would read as two."""
        for t in [*add, *remove]:
            if not str(t).strip():
                raise UsageError("a tag is empty: give a word (-TAG removes one)")
            if len(str(t).split()) != 1 or str(t) != str(t).strip():
                raise UsageError(f"tag {t!r} has whitespace: a tag is one word (e.g. {'-'.join(str(t).split())})")
            if any(unicodedata.category(c) == "Cc" for c in str(t)):  # an escape sequence: was stored as the tag
                raise UsageError(f"tag {t!r} has a control character: a tag is one printable word")
        self._writable()  # was sqlite's "attempt to write a readonly database"
        run = self.get_run(run_id)
        tags = sorted((set(run.get("tags") or []) | {t for t in add if t}) - set(remove))
        self.db["runs"].update(run["id"], {"tags": json.dumps(tags)})
        return tags

    def note_run(self, run_id: str, note: str | None) -> None:
        """Set (or with None clear) a run's note."""
        self._writable()
        self.db["runs"].update(self.get_run(run_id)["id"], {"note": note or None})

    def dependents(self, run_ids: list[str]) -> list[dict]:
        """Every run outside `run_ids` that depends on one of them: it read one of their artifacts (lineage,
        recursively) or evaluates a training run among them (model_run_id)."""
        ids, out, frontier = set(run_ids), [], list(run_ids)
        while frontier:
            rid = frontier.pop(0)
            kids = [d for d in self.derived_runs(rid)] + self.runs(model_run_id=rid)
            for d in kids:
                if d["id"] not in ids:
                    ids.add(d["id"])
                    out.append(d)
                    frontier.append(d["id"])
        return out

    def remove_runs(self, run_ids: list[str], *, cascade: bool = False, dry_run: bool = False) -> dict:
        """Delete runs with their metrics, checks, lineage edges and the artifacts no remaining run uses.

        A run others depend on (see `dependents`) is refused with a UsageError unless `cascade`, which
        removes the dependents too. A running run is refused. The database changes are one transaction; the
        files are deleted after it commits (a crash in between leaves files that `gc` removes). Files
        outside the store (checkpoints registered by path) are never deleted, only forgotten.
        Returns {removed: [run ids], files_removed, bytes_freed, dry_run}."""
        from epcli.errors import UsageError
        self._writable()  # a dry run too: it previews by deleting inside a transaction it rolls back
        runs = [self.get_run(r) for r in run_ids]
        ids = list(dict.fromkeys(r["id"] for r in runs))
        deps = self.dependents(ids)
        if deps and not cascade:
            shown = ", ".join(f"{d['id']} ({d['kind']})" for d in deps[:5]) + (" ..." if len(deps) > 5 else "")
            raise UsageError(f"{len(deps)} run(s) depend on {', '.join(ids)}: {shown}; pass --cascade to remove "
                             "them too")
        ids += [d["id"] for d in deps]
        running = [r for r in [self.get_run(i) for i in ids] if r["status"] == "running"]
        if running:
            raise UsageError(f"run {running[0]['id']} is still running; stop it first")
        marks = ",".join("?" * len(ids))
        files: list[Path] = []
        freed = 0
        with self.write_transaction(dry_run):
            arts = list(self.db.query(
                f"SELECT DISTINCT a.* FROM artifacts a JOIN run_artifacts ra ON ra.sha256 = a.sha256 "
                f"WHERE ra.run_id IN ({marks})", ids))
            for a in arts:
                others = list(self.db.query(
                    f"SELECT run_id, role FROM run_artifacts WHERE sha256 = ? AND run_id NOT IN ({marks})",
                    [a["sha256"], *ids]))
                if others:  # still used: keep it, and give it a producer that still exists
                    if a["run_id"] in ids:
                        outs = [o["run_id"] for o in others if o["role"] == "output"]
                        self.db.execute("UPDATE artifacts SET run_id = ? WHERE sha256 = ?",
                                        [outs[0] if outs else None, a["sha256"]])
                    continue
                self.db.execute("DELETE FROM run_artifacts WHERE sha256 = ?", [a["sha256"]])
                self.db.execute("DELETE FROM artifacts WHERE sha256 = ?", [a["sha256"]])
                if not Path(a["path"]).is_absolute():
                    files.append(self.root / a["path"])
                    freed += int(a["size"] or 0)
            # artifacts produced by a removed run that no run links any more
            for a in list(self.db.query(f"SELECT * FROM artifacts WHERE run_id IN ({marks})", ids)):
                self.db.execute("DELETE FROM artifacts WHERE sha256 = ?", [a["sha256"]])
                if not Path(a["path"]).is_absolute():
                    files.append(self.root / a["path"])
                    freed += int(a["size"] or 0)
            for table in ("run_artifacts", "metrics", "checks"):
                self.db.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", ids)
            self.db.execute(f"DELETE FROM runs WHERE id IN ({marks})", ids)
        if not dry_run:
            for f in files:
                f.unlink(missing_ok=True)
        return {"removed": ids, "files_removed": len(files), "bytes_freed": freed, "dry_run": dry_run}

    def gc(self, *, dry_run: bool = False, grace_seconds: float | None = None) -> dict:
        """Make every artifact row have its file and every file its row: delete artifact rows no run links
        (and their files), rows whose file inside the store is gone (with their links), and files under
        artifacts/ and tmp/ without a row. A file younger than `grace_seconds` may belong to a write in
        progress and is kept (default: 10 minutes while any run is running, else 0).
        Returns {artifacts_removed, files_removed, bytes_freed, dry_run}."""
        if not dry_run:
            self._writable()
        if grace_seconds is None:
            busy = list(self.db.query("SELECT 1 FROM runs WHERE status = 'running' LIMIT 1"))
            grace_seconds = 600.0 if busy else 0.0
        cutoff = time.time() - grace_seconds
        files: list[Path] = []
        freed, rows_removed = 0, 0
        with self.write_transaction(dry_run):
            for a in list(self.db.query("SELECT * FROM artifacts")):
                inside = not Path(a["path"]).is_absolute()
                path = self.root / a["path"] if inside else Path(a["path"])
                linked = list(self.db.query("SELECT 1 FROM run_artifacts WHERE sha256 = ? LIMIT 1", [a["sha256"]]))
                missing = inside and not path.exists()
                if linked and not missing:
                    continue
                self.db.execute("DELETE FROM run_artifacts WHERE sha256 = ?", [a["sha256"]])
                self.db.execute("DELETE FROM artifacts WHERE sha256 = ?", [a["sha256"]])
                rows_removed += 1
                if inside and not missing:
                    files.append(path)
                    freed += path.stat().st_size
            known = {str(self.root / r["path"]) for r in self.db.query("SELECT path FROM artifacts")}
            for folder in (self.artifacts_dir, self.root / "tmp"):
                for f in folder.rglob("*") if folder.exists() else []:
                    if f.is_file() and str(f) not in known and f not in files and f.stat().st_mtime <= cutoff:
                        files.append(f)
                        freed += f.stat().st_size
        if not dry_run:
            for f in files:
                f.unlink(missing_ok=True)
            for d in sorted(self.artifacts_dir.glob("*"), reverse=True) if self.artifacts_dir.exists() else []:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        return {"artifacts_removed": rows_removed, "files_removed": len(files), "bytes_freed": freed,
                "dry_run": dry_run}

    def check_invariants(self) -> list[str]:
        """Problems with the store's files: artifact rows without their file, files without a row, links to
        missing artifacts. Empty when the store is consistent."""
        problems = []
        known = set()
        for a in self.db.query("SELECT sha256, path FROM artifacts"):
            p = Path(a["path"])
            if not p.is_absolute():
                known.add(str(self.root / p))
                if not (self.root / p).is_file():
                    problems.append(f"artifact {a['sha256'][:12]} has no file {a['path']}")
        if self.artifacts_dir.exists():
            for f in self.artifacts_dir.rglob("*"):
                if f.is_file() and str(f) not in known:
                    problems.append(f"file {f.relative_to(self.root)} has no artifact row")
        for r in self.db.query("SELECT ra.run_id, ra.sha256 FROM run_artifacts ra LEFT JOIN artifacts a "
                               "ON a.sha256 = ra.sha256 WHERE a.sha256 IS NULL"):
            problems.append(f"run {r['run_id']} links a missing artifact {r['sha256'][:12]}")
        return problems

# --- helpers --------------------------------------------------------------------------------------------

def _decode_run(row: dict) -> dict:
    row = dict(row)
    for k in ("argv", "config", "summary", "tags"):
        if row.get(k):
            try:
                row[k] = json.loads(row[k])
            except (TypeError, ValueError):
                pass
    tags = row.get("tags")
    if tags and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        # a hand-edited tags cell ("paper", 3, {...}): one tag as written, not a tag per character
        row["tags"] = [tags if isinstance(tags, str) else json.dumps(tags)]
    return row


_OPS = (">=", "<=", "!=", "=", ">", "<")


def parse_condition(text: str) -> tuple[str, str, Any]:
    """'test_acc>0.5' -> ('test_acc', '>', 0.5); the value is a number when it reads as one."""
    from epcli.errors import UsageError
    for op in _OPS:
        if op in text:
            name, raw = text.split(op, 1)
            name, raw = name.strip(), raw.strip()
            if name and raw and raw[0] in "<>=!":  # 'test_acc>>1': an operator typo, not the string '>1'
                raise UsageError(f"cannot read the condition {text!r}: one operator, one of {' '.join(_OPS)}")
            if name and raw:
                try:
                    value = float(raw)
                except ValueError:
                    return name, op, raw
                if value != value:  # NaN: every comparison is false, the condition would match nothing
                    raise UsageError(f"cannot read the condition {text!r}: {raw} is not a number to compare with")
                return name, op, value
    raise UsageError(f"cannot read the condition {text!r}: use NAME OP VALUE with OP one of "
                     f"{' '.join(_OPS)}, e.g. test_acc>0.5 or config.recipe.epochs=20")


def parse_since(text: str) -> str:
    """An ISO date/time, or an age (30m, 12h, 7d, 2w) -> an ISO UTC timestamp to compare started_at with."""
    from datetime import timedelta

    from epcli.errors import UsageError
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if not t:
        raise UsageError("--since is empty: give a date like 2026-11-29 or an age like 12h, or leave it out")
    try:
        if t[:-1].replace(".", "", 1).isdigit() and t[-1:] in units:
            return (datetime.now(timezone.utc) - timedelta(seconds=float(t[:-1]) * units[t[-1]])).isoformat(
                timespec="milliseconds")
        d = datetime.fromisoformat(t)
        if d.tzinfo is None:
            d = d.replace(tzinfo=timezone.utc)
        return d.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    except OverflowError:  # an age beyond year 1, or a date that leaves the calendar once moved to UTC
        raise UsageError(f"--since {text!r} is outside the calendar (years 1 to 9999)") from None
    except ValueError:
        raise UsageError(f"cannot read --since {text!r}: use a date like 2026-11-29, a time like "
                         "2026-11-29T14:00, or an age like 30m, 12h, 7d") from None


def _compare(value: Any, op: str, want: Any) -> bool:
    if value is None:
        return False
    if isinstance(want, float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return False
    else:
        value = str(value)
    return {">=": value >= want, "<=": value <= want, "!=": value != want, "=": value == want,
            ">": value > want, "<": value < want}[op]


def _sort_key(v: Any):
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ENV: dict | None = None


def environment() -> dict:
    """Versions and git commit, computed once per process."""
    global _ENV
    if _ENV is None:
        from epcli import __version__
        commit = None
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                    capture_output=True, timeout=5).stdout.strip() or None
            if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                         cwd=Path(__file__).parent, text=True, capture_output=True,
                                         timeout=5).stdout.strip():
                commit += "-dirty"
        except (OSError, subprocess.SubprocessError):
            pass
        _ENV = {"epcli_version": __version__, "git_commit": commit}
    env = dict(_ENV)
    torch = sys.modules.get("torch")
    if torch is not None:
        env.update(torch_version=torch.__version__, cuda_version=torch.version.cuda)
    else:  # a run that never loads torch (a report): the installed version, without the seconds an import takes
        from importlib import metadata
        try:
            env.update(torch_version=metadata.version("torch"), cuda_version=None)
        except metadata.PackageNotFoundError:
            env.update(torch_version=None, cuda_version=None)
    return env


def describe_device(device: str) -> str:
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
