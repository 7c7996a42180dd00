CREATE TABLE keys (
    seq                  BIGSERIAL PRIMARY KEY,
    id                   TEXT NOT NULL UNIQUE,
    description          TEXT NOT NULL,
    state                TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    deletion_date        BIGINT,
    rotation_period_days INTEGER,
    next_rotation        BIGINT
);
CREATE TABLE key_versions (
    key_id         TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    version        INTEGER NOT NULL,
    created_at     BIGINT NOT NULL,
    wraps_reserved BIGINT NOT NULL DEFAULT 0,
    automatic      BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE aliases (
    name   TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE
);
CREATE INDEX aliases_by_key ON aliases(key_id);
CREATE TABLE key_tags (
    key_id    TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    tag_key   TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
CREATE TABLE deleted_keys (
    id         TEXT PRIMARY KEY,
    deleted_at BIGINT NOT NULL
);
CREATE TABLE pending_versions (
    key_id  TEXT NOT NULL,
    version INTEGER NOT NULL,
    owner   TEXT NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE audit_heads (
    chain TEXT PRIMARY KEY,
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
