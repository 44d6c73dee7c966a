-- The catalog owns products: what is sold, for how much, and how many are left.
CREATE TABLE products (
    id          TEXT PRIMARY KEY,                      -- the SKU, e.g. 'sku-espresso'
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL DEFAULT 'EUR',
    stock       INTEGER NOT NULL DEFAULT 0 CHECK (stock >= 0),
    category    TEXT NOT NULL,
    image       TEXT
);

CREATE INDEX products_by_category ON products (category);
