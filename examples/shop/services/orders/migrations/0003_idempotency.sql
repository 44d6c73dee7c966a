-- The `Idempotency-Key` of `POST /api/orders`: a placement retried because
-- its answer was lost (a dropped connection, the gateway retrying a 502)
-- answers with the order it placed, never a second order and a second
-- charge. A key is its customer's own. `request` is the placement as the
-- order saw it (its lines, coupon, expected total and the card's last four
-- digits, never the card), to tell a retry from another order sent under
-- the same key. Kept as long as the order: one row per order at most.
CREATE TABLE order_idempotency_keys (
    customer TEXT NOT NULL,
    key      TEXT NOT NULL,
    request  TEXT NOT NULL,
    order_id TEXT NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    PRIMARY KEY (customer, key)
);
