-- Version destruction (ScheduleKeyVersionDestruction): when a retired version's object may be
-- destroyed, and when it was (Unix milliseconds).
ALTER TABLE key_versions ADD COLUMN destruction_date INTEGER;
ALTER TABLE key_versions ADD COLUMN destroyed_at INTEGER;
