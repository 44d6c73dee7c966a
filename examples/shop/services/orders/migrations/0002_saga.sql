-- The order saga: an order is `placed`, then `confirmed` or `cancelled` by
-- the events of inventory and payments. `reason` says why it was cancelled
-- (out_of_stock, payment_declined).
ALTER TABLE orders ADD COLUMN reason TEXT;
-- Only the last four digits of the card paid with: enough to show, useless
-- to anyone who reads the database.
ALTER TABLE orders ADD COLUMN card_last4 TEXT;

-- Every status an order went through, when: the UI shows its progress.
CREATE TABLE order_status_history (
    order_id TEXT NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,            -- 0 for `placed`, then 1, ...
    status   TEXT NOT NULL,
    reason   TEXT,
    at       TEXT NOT NULL,               -- RFC 3339 UTC
    PRIMARY KEY (order_id, seq)
);

-- Orders placed before the saga existed start their history at placement.
INSERT INTO order_status_history (order_id, seq, status, reason, at)
SELECT id, 0, status, NULL, created_at FROM orders;
