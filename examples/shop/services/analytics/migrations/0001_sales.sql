-- Sales per product, from confirmed orders. Revenue is quantity times the
-- unit price the order was placed at (before order-level discounts and
-- tax, which belong to the order, not to one product).
CREATE TABLE product_sales (
    sku           TEXT NOT NULL,
    currency      TEXT NOT NULL,
    units         INTEGER NOT NULL,
    revenue_cents INTEGER NOT NULL,
    orders        INTEGER NOT NULL,           -- confirmed orders containing it
    PRIMARY KEY (sku, currency)
);

-- The last stream record applied per partition, written in the same
-- transaction as the sales it added. The broker's group checkpoint may lag
-- (it is written after the commit and can be lost in a crash); on restart
-- reading resumes after whichever is further, and a record at or below
-- this position is skipped, so nothing is counted twice.
CREATE TABLE stream_positions (
    stream        TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    PRIMARY KEY (stream, partition)
);
