-- Orders cancelled (`order.cancelled`, whatever the reason: out of stock,
-- declined, or past the saga's deadline). A `stock.reserved` for one of
-- them that arrives afterwards is declined (`order_cancelled`) without
-- asking the card processor: a cancelled order is never charged.
CREATE TABLE cancelled_orders (
    order_id     TEXT PRIMARY KEY,
    customer     TEXT NOT NULL,
    reason       TEXT,                      -- the order's, e.g. timed_out
    cancelled_at TEXT NOT NULL              -- RFC 3339 UTC, when payments heard
);

-- Charges given back because their order was cancelled after it was
-- charged (orders' deadline passed while the charge was on its way). One
-- per charge at most (UNIQUE charge_id): a redelivered or re-published
-- `order.cancelled` finds it and never refunds twice.
CREATE TABLE refunds (
    id           TEXT PRIMARY KEY,          -- re_<uuid>
    charge_id    TEXT NOT NULL UNIQUE REFERENCES charges (id),
    order_id     TEXT NOT NULL,
    customer     TEXT NOT NULL,
    amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency     TEXT NOT NULL,
    reason       TEXT,                      -- the order's cancellation reason
    created_at   TEXT NOT NULL              -- RFC 3339 UTC
);
