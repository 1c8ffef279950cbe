"""The embedded registry: volume and export records in SQLite under home.

Never inside a volume directory, where a guest could touch it. WAL journal, one writer:
every method takes the registry's lock, so the daemon may call it from worker threads.
Blocking: every method does disk I/O.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator

from volumed.errors import AlreadyExists, DiskFull, StorageError
from volumed.model import ListFilter, Volume

log = logging.getLogger(__name__)

#: 2 added ``volumes.backing`` (sized volumes are images); 1 had no such column.
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('named', 'anonymous')),
    created_at  TEXT NOT NULL,
    labels      TEXT NOT NULL DEFAULT '{}',
    size_bytes  INTEGER,
    inode_limit INTEGER,
    consumer    TEXT,
    backing     TEXT NOT NULL DEFAULT 'directory' CHECK (backing IN ('directory', 'image')),
    CHECK ((kind = 'named') = (name IS NOT NULL))
);
CREATE TABLE IF NOT EXISTS exports (
    id          TEXT PRIMARY KEY,
    volume_id   TEXT NOT NULL REFERENCES volumes(id),
    kind        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    spec        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS exports_by_volume ON exports(volume_id);
"""
_COLUMNS = "id, name, kind, created_at, labels, size_bytes, inode_limit, consumer, backing"
_SELECT = (
    "SELECT v.id, v.name, v.kind, v.created_at, v.labels, v.size_bytes, v.inode_limit, "
    "v.consumer, v.backing, COALESCE(e.n, 0) AS exports FROM volumes v LEFT JOIN "
    "(SELECT volume_id, COUNT(*) AS n FROM exports GROUP BY volume_id) e ON e.volume_id = v.id"
)
# The API's volume object, built by SQLite (keep in step with volumed.api.volume_json).
_VOLUME_JSON = (
    "json_object('id', id, 'name', name, 'kind', kind, 'created_at', created_at, "
    "'labels', json(labels), 'size_bytes', size_bytes, 'inode_limit', inode_limit, "
    "'consumer', consumer, 'backing', backing, "
    "'in_use', json(CASE WHEN exports > 0 THEN 'true' ELSE 'false' END), "
    "'exports', exports)"
)


def _where(where: ListFilter) -> tuple[str, list[object]]:
    """SQL conditions and arguments for a listing filter (label keys cannot hold quotes:
    volumed.names allows only [A-Za-z0-9_./-] in them)."""
    clauses: list[str] = []
    args: list[object] = []
    if where.kind is not None:
        clauses.append("v.kind = ?")
        args.append(where.kind)
    if where.name_contains is not None:
        clauses.append("instr(COALESCE(v.name, v.id), ?) > 0")
        args.append(where.name_contains)
    if where.in_use is not None:
        clauses.append("COALESCE(e.n, 0) > 0" if where.in_use else "COALESCE(e.n, 0) = 0")
    for key, value in where.labels:
        path = f'$."{key}"'
        if value is None:
            clauses.append("json_type(v.labels, ?) IS NOT NULL")
            args.append(path)
        else:
            clauses.append("json_type(v.labels, ?) = 'text' AND json_extract(v.labels, ?) = ?")
            args.extend((path, path, value))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _row_to_volume(row: tuple[object, ...]) -> Volume:
    vid, name, kind, created_at, labels, size_bytes, inode_limit, consumer, backing = row
    return Volume(
        id=str(vid),
        name=name if isinstance(name, str) else None,
        kind="named" if kind == "named" else "anonymous",
        created_at=str(created_at),
        labels=json.loads(str(labels)),
        size_bytes=size_bytes if isinstance(size_bytes, int) else None,
        inode_limit=inode_limit if isinstance(inode_limit, int) else None,
        consumer=consumer if isinstance(consumer, str) else None,
        backing="image" if backing == "image" else "directory",
    )


def _storage_error(exc: sqlite3.Error, message: str) -> StorageError:
    """A registry failure as the error it is: DiskFull when SQLite ran out of room."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
        return DiskFull(message)
    return StorageError(message)


class Registry:
    """Volume records with their export counts; the single source of truth for names."""

    _db: sqlite3.Connection
    _lock: threading.Lock

    def __init__(self, path: str) -> None:
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL keeps the database consistent across a crash; a create lost with the last
            # transactions leaves a directory without a row, which reconciliation adopts.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise _storage_error(
                exc,
                f"cannot open the registry {path}: {exc}; check that the home directory is "
                "writable and not used by another boxvold",
            ) from exc
        self._lock = threading.Lock()
        self.path = path
        #: The number of volume rows, kept in memory so that ``count`` (health) never waits
        #: behind a listing for the database; changed only after a commit.
        (self._count,) = self._db.execute("SELECT COUNT(*) FROM volumes").fetchone()
        self._count_lock = threading.Lock()

    def _migrate(self) -> None:
        """Create or upgrade the schema, writing nothing when it is current: start-up must
        work on a full disk (docs/storage.md)."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        if "volumes" in tables:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(volumes)")}
            if "backing" not in columns:
                self._db.execute(
                    "ALTER TABLE volumes ADD COLUMN backing TEXT NOT NULL DEFAULT 'directory' "
                    "CHECK (backing IN ('directory', 'image'))"
                )
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT under the writer lock; rolled back on any failure
        (including a failed COMMIT, so the connection never stays mid-transaction)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _storage_error(
                        exc,
                        f"the registry {self.path} refused a write: {exc}; check the disk "
                        "holding the boxvol home (space, permissions)",
                    ) from exc
                raise

    @contextlib.contextmanager
    def inserting(self, volume: Volume) -> Iterator[None]:
        """Insert ``volume`` and commit only if the body (e.g. its mkdir) succeeds.

        Holds the writer lock for the whole body, so a concurrent create of the same name
        either sees this row or waits for its rollback.
        """
        with self._transaction():
            try:
                self._db.execute(
                    f"INSERT INTO volumes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        volume.id,
                        volume.name,
                        volume.kind,
                        volume.created_at,
                        json.dumps(volume.labels, sort_keys=True),
                        volume.size_bytes,
                        volume.inode_limit,
                        volume.consumer,
                        volume.backing,
                    ),
                )
            except sqlite3.IntegrityError:
                what = f"named {volume.name!r}" if volume.name else f"with id {volume.id}"
                raise AlreadyExists(
                    f"a volume {what} already exists; pick another name or remove it first "
                    f"with 'boxvol rm {volume.key}'"
                ) from None
            yield
        self._counted(1)

    @contextlib.contextmanager
    def deleting(self, volume_id: str) -> Iterator[None]:
        """Delete a volume's row and its export rows; commit only if the body succeeds."""
        with self._transaction():
            self._db.execute("DELETE FROM exports WHERE volume_id = ?", (volume_id,))
            removed = self._db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,)).rowcount
            yield
        self._counted(-removed)

    @contextlib.contextmanager
    def resizing(self, volume_id: str, size_bytes: int) -> Iterator[None]:
        """Record a volume's new size; commit only if the body (the growth) succeeds."""
        with self._transaction():
            self._db.execute(
                "UPDATE volumes SET size_bytes = ? WHERE id = ?", (size_bytes, volume_id)
            )
            yield

    def _counted(self, delta: int) -> None:
        with self._count_lock:
            self._count += delta

    def by_id(self, volume_id: str) -> Volume | None:
        """The volume with exactly this id (case-insensitive), if any."""
        return self._one("WHERE id = ?", (volume_id.upper(),))

    def by_name(self, name: str) -> Volume | None:
        """The named volume called ``name``, if any."""
        return self._one("WHERE name = ?", (name,))

    def by_id_prefix(self, prefix: str, limit: int = 2) -> list[Volume]:
        """Up to ``limit`` volumes whose id starts with ``prefix`` (case-insensitive)."""
        upper = prefix.upper()
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM volumes WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                (upper, upper + "\x7f", limit),
            ).fetchall()
        return [_row_to_volume(row) for row in rows]

    def all(self, kind: str | None = None) -> list[Volume]:
        """Every volume (of one kind if given), oldest first."""
        where, args = ("WHERE kind = ?", (kind,)) if kind else ("", ())
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM volumes {where} ORDER BY id", args
            ).fetchall()
        return [_row_to_volume(row) for row in rows]

    def count(self) -> int:
        """How many volumes there are (from memory: never waits for the database)."""
        return int(self._count)

    def count_by_kind(self) -> dict[str, int]:
        """How many volumes of each kind there are (kinds without volumes are absent)."""
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM volumes GROUP BY kind").fetchall()
        return {str(kind): int(count) for kind, count in rows}

    def select(self, where: ListFilter) -> list[tuple[Volume, int]]:
        """Volumes passing ``where`` with their live export counts, oldest first."""
        conditions, args = _where(where)
        with self._lock:
            rows = self._db.execute(f"{_SELECT}{conditions} ORDER BY v.id", args).fetchall()
        return [(_row_to_volume(row[:-1]), int(row[-1])) for row in rows]

    def select_json(self, where: ListFilter) -> str:
        """The same as ``select``, as the API's JSON array, encoded by SQLite."""
        conditions, args = _where(where)
        query = (
            f"SELECT COALESCE(json_group_array(json({_VOLUME_JSON})), '[]') "
            f"FROM ({_SELECT}{conditions} ORDER BY v.id)"
        )
        with self._lock:
            (document,) = self._db.execute(query, args).fetchone()
        return str(document)

    def export_counts(self) -> dict[str, int]:
        """Live export count per volume id (volumes without exports are absent)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT volume_id, COUNT(*) FROM exports GROUP BY volume_id"
            ).fetchall()
        return {str(vid): int(count) for vid, count in rows}

    def add_export(
        self, export_id: str, volume_id: str, kind: str, created_at: str, spec: dict[str, object]
    ) -> None:
        """Record a live export of a volume (which makes the volume "in use")."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO exports (id, volume_id, kind, created_at, spec) "
                "VALUES (?, ?, ?, ?, ?)",
                (export_id, volume_id, kind, created_at, json.dumps(spec, sort_keys=True)),
            )

    def remove_export(self, export_id: str) -> None:
        """Forget an export."""
        with self._transaction():
            self._db.execute("DELETE FROM exports WHERE id = ?", (export_id,))

    def exports(self) -> list[tuple[str, str, str, str, dict[str, object]]]:
        """Every export as (id, volume id, kind, created at, spec), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, volume_id, kind, created_at, spec FROM exports ORDER BY id"
            ).fetchall()
        return [(str(a), str(b), str(c), str(d), json.loads(e)) for a, b, c, d, e in rows]

    def _one(self, where: str, args: tuple[object, ...]) -> Volume | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM volumes {where}", args).fetchone()
        return _row_to_volume(row) if row else None
