-- Key policies (GetKeyPolicy/PutKeyPolicy): each key's policy document; NULL for a key made
-- before key policies, which has AWS's default policy (the account may do everything).
ALTER TABLE keys ADD COLUMN policy TEXT;
