-- Automatic rotation (schedule per key, how each version was made) and tags.
ALTER TABLE keys ADD COLUMN rotation_period_days INTEGER;
ALTER TABLE keys ADD COLUMN next_rotation INTEGER;
ALTER TABLE key_versions ADD COLUMN automatic INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS key_tags (
    key_id    TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    tag_key   TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
