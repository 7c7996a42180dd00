-- Version retirement (RetireKeyVersion): a retired version unwraps nothing until restored.
ALTER TABLE key_versions ADD COLUMN retired INTEGER NOT NULL DEFAULT 0;
