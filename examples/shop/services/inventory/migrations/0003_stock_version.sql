-- A per-SKU counter, incremented in the transaction of every change to
-- `available`. The events that announce a change carry the SKU's new
-- `available` with this version, so a reader of them (the catalog's stock
-- figure) can drop a redelivered or overtaken event instead of moving its
-- copy backwards. Commits move units out of `reserved` only and leave it
-- alone. The seeded levels are version 0.
ALTER TABLE stock ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
