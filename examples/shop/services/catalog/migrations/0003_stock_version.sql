-- Inventory owns stock; `stock` is the catalog's copy of a SKU's available
-- units, kept by the `stock.reserved` / `stock.released` events (queue
-- `catalog-stock`). `stock_version` is the inventory version that figure
-- is from: a level is applied only when its version is newer, so a
-- redelivered or overtaken event never moves the figure backwards. The
-- seed agrees with inventory's seed, which is version 0.
ALTER TABLE products ADD COLUMN stock_version INTEGER NOT NULL DEFAULT 0;
