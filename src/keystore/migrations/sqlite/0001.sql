CREATE TABLE IF NOT EXISTS keys (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    description   TEXT NOT NULL,
    state         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    deletion_date INTEGER
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id         TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    version        INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    wraps_reserved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name   TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS aliases_by_key ON aliases(key_id);
CREATE TABLE IF NOT EXISTS deleted_keys (
    id         TEXT PRIMARY KEY,
    deleted_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_versions (
    key_id  TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS audit_heads (
    chain TEXT PRIMARY KEY,
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);
