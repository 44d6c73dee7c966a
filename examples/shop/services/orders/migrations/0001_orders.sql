-- Orders own what was bought, at which price, by whom. Prices are copied
-- from the catalog and the quote at order time: later catalog changes must
-- not rewrite history.
CREATE TABLE orders (
    id             TEXT PRIMARY KEY,       -- UUID v4
    customer       TEXT NOT NULL,          -- stand-in identity: see src/customer.rs
    status         TEXT NOT NULL,          -- 'placed'
    currency       TEXT NOT NULL,
    coupon         TEXT,
    subtotal_cents INTEGER NOT NULL,
    discount_cents INTEGER NOT NULL,
    tax_cents      INTEGER NOT NULL,
    total_cents    INTEGER NOT NULL,
    created_at     TEXT NOT NULL           -- RFC 3339 UTC, sorts as text
);

CREATE INDEX orders_by_customer ON orders (customer, created_at);

CREATE TABLE order_lines (
    order_id         TEXT NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line_no          INTEGER NOT NULL,
    sku              TEXT NOT NULL,
    name             TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL,
    discount_cents   INTEGER NOT NULL,
    line_total_cents INTEGER NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
