-- Version retirement (RetireKeyVersion): a retired version unwraps nothing until restored.
ALTER TABLE key_versions ADD COLUMN retired BOOLEAN NOT NULL DEFAULT FALSE;
