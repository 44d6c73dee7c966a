-- What each customer has been told about their orders. One message per
-- order and outcome (UNIQUE): a redelivered event, even re-published under
-- a new id, cannot tell the customer twice.
CREATE TABLE notifications (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- also the newest-first order
    customer   TEXT NOT NULL,
    order_id   TEXT NOT NULL,
    kind       TEXT NOT NULL,                      -- 'order.confirmed', 'order.cancelled'
    message    TEXT NOT NULL,
    created_at TEXT NOT NULL,                      -- RFC 3339 UTC
    UNIQUE (order_id, kind)
);

CREATE INDEX notifications_by_customer ON notifications (customer, id);
