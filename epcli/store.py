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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlite_utils
from sqlite_utils.migrations import Migrations

from epcli.errors import NotFoundError, StoreError, UsageError

DB_NAME = "epcli.db"
SCHEMA_VERSION = 1
RUN_KINDS = ("train", "attack", "corrupt", "report")
STATUSES = ("running", "finished", "failed", "interrupted")
FACETS = ("dataset", "split", "model", "attack", "norm", "eps", "grad_mode", "corruption", "severity",
          "n_examples")

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
    db.execute("""CREATE VIEW leaderboard AS
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
        FROM runs t WHERE t.kind = 'train' AND t.status = 'finished'""")


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
        self.db = self._open_readonly() if self.readonly else self._open()

    # connection and schema
    def _inspect(self) -> None:
        """Look at an existing database through a read-only connection; refuse it unless it is an epcli
        store this epcli can read. Nothing is written (no WAL switch, no migrations table)."""
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a readable SQLite database ({e}); it was left untouched") \
                from None
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
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
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("SELECT COUNT(*) FROM runs").fetchone()
        except sqlite3.DatabaseError:
            # a WAL database in a folder we cannot write: read the file as it is (nobody can be writing it)
            conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        return sqlite_utils.Database(conn)

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

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store {self.root} is read-only here (no write permission); commands that "
                             "only read (runs, show, report, trace, compare) work on it")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _mark_stale(self, db: sqlite_utils.Database) -> None:
        """Runs left 'running' by a process on this host that no longer exists were interrupted."""
        host = socket.gethostname()
        for r in db.query("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?", [host]):
            if r["pid"] and not _pid_alive(r["pid"]):
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
        """Open a run; close it as finished, failed (with the error text) or interrupted (Ctrl-C)."""
        run_id = self.start_run(kind, config, **kwargs)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.finish_run(run_id, "interrupted", "interrupted by the user (Ctrl-C)")
            raise
        except BaseException as e:
            self.finish_run(run_id, "failed", f"{type(e).__name__}: {e}".strip())
            raise
        else:
            if self.get_run(run_id)["status"] == "running":
                self.finish_run(run_id, "finished")

    def get_run(self, run_id: str) -> dict:
        """A run by id or by a unique id prefix."""
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
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UsageError(f"limit must be a positive integer, got {limit!r}")
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
            tmp.unlink(missing_ok=True)
        rel = str(dest.relative_to(self.root))
        with self.db.atomic():  # row and lineage edge together: a kill never leaves an unlinked artifact
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


# --- helpers --------------------------------------------------------------------------------------------

def _decode_run(row: dict) -> dict:
    row = dict(row)
    for k in ("argv", "config", "summary"):
        if row.get(k):
            try:
                row[k] = json.loads(row[k])
            except (TypeError, ValueError):
                pass
    return row


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ENV: dict | None = None


def environment() -> dict:
    """Versions and git commit, computed once per process."""
    global _ENV
    if _ENV is None:
        import torch
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
        _ENV = {"epcli_version": __version__, "torch_version": torch.__version__,
                "cuda_version": torch.version.cuda, "git_commit": commit}
    return dict(_ENV)


def describe_device(device: str) -> str:
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
