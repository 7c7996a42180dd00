-- Grants (CreateGrant): who may make which operations on a key, with which encryption
-- context; deleted with their key.
CREATE TABLE key_grants (
    key_id            TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    grant_id          TEXT NOT NULL,
    name              TEXT NOT NULL,
    grantee           TEXT NOT NULL,
    retiring          TEXT,
    operations        TEXT NOT NULL,
    constraint_equals TEXT,
    constraint_subset TEXT,
    issuer            TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    PRIMARY KEY (key_id, grant_id)
);
