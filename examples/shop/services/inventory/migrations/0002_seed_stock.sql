-- The same SKUs and quantities as the catalog's seed
-- (services/catalog/migrations/0002_seed_products.sql): the two start in
-- agreement. INSERT OR IGNORE so a restored database never fails here.
INSERT OR IGNORE INTO stock (sku, available) VALUES
    ('sku-espresso',  120),
    ('sku-filter',     80),
    ('sku-decaf',      40),
    ('sku-cold-brew',  25),
    ('sku-green-tea',  60),
    ('sku-earl-grey',  75),
    ('sku-chai',        0),
    ('sku-grinder',     8),
    ('sku-kettle',     15),
    ('sku-dripper',    30),
    ('sku-mug',       200),
    ('sku-croissant',  48);
