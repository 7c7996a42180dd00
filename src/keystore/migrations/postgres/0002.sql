-- Key import: where a key's material comes from, and the imported material's check
-- value, presence and expiry.
ALTER TABLE keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'HSM';
ALTER TABLE keys ADD COLUMN material_check TEXT;
ALTER TABLE keys ADD COLUMN material_present BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE keys ADD COLUMN material_valid_to BIGINT;
