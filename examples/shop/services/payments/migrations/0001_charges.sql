-- Payments owns the charges it made. One per order at most (UNIQUE
-- order_id): a redelivered or re-published `stock.reserved` finds the
-- charge and never charges twice. Only the card's last four digits are
-- kept; the number itself is never stored here.
CREATE TABLE charges (
    id           TEXT PRIMARY KEY,          -- ch_<uuid>
    order_id     TEXT NOT NULL UNIQUE,
    customer     TEXT NOT NULL,
    amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency     TEXT NOT NULL,
    card_last4   TEXT,                      -- NULL when the number was malformed
    status       TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')),
    reason       TEXT,                      -- the decline code when failed
    created_at   TEXT NOT NULL              -- RFC 3339 UTC
);
