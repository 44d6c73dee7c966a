-- Inventory owns how many of each product can still be promised. The
-- catalog's `stock` column is the shop window's figure; this is the one the
-- order saga reserves against.
CREATE TABLE stock (
    sku       TEXT PRIMARY KEY,
    available INTEGER NOT NULL CHECK (available >= 0),   -- free to reserve
    reserved  INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0) -- held for orders awaiting payment
);

-- One row per order that asked for stock, whatever the answer: a second
-- `order.placed` for the same order (a re-publish with a new event id)
-- finds it and changes nothing.
CREATE TABLE reservations (
    order_id   TEXT PRIMARY KEY,
    customer   TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('reserved', 'rejected', 'committed', 'released')),
    reason     TEXT,                    -- why it was rejected
    created_at TEXT NOT NULL,           -- RFC 3339 UTC
    updated_at TEXT NOT NULL
);

CREATE TABLE reservation_items (
    order_id TEXT NOT NULL REFERENCES reservations (order_id) ON DELETE CASCADE,
    sku      TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku)
);
