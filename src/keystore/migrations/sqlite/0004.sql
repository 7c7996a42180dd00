-- How each key version is used (wraps, unwraps, first and last use), added up by every
-- daemon from batches of its own counts.
CREATE TABLE IF NOT EXISTS version_usage (
    key_id     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    wraps      INTEGER NOT NULL DEFAULT 0,
    unwraps    INTEGER NOT NULL DEFAULT 0,
    first_used INTEGER,
    last_used  INTEGER,
    PRIMARY KEY (key_id, version),
    FOREIGN KEY (key_id, version) REFERENCES key_versions(key_id, version) ON DELETE CASCADE
);
