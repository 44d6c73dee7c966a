-- The reference shop's products. INSERT OR IGNORE so that re-seeding a
-- database restored from elsewhere never fails on existing SKUs.
INSERT OR IGNORE INTO products (id, name, description, price_cents, currency, stock, category, image) VALUES
    ('sku-espresso',   'Espresso Roast',          'Dark chocolate and caramel, 250 g whole beans for espresso.',          899, 'EUR', 120, 'coffee',    'images/sku-espresso.svg'),
    ('sku-filter',     'Filter Roast',            'Bright citrus and jasmine, 250 g whole beans for pour-over.',          849, 'EUR',  80, 'coffee',    'images/sku-filter.svg'),
    ('sku-decaf',      'Swiss Water Decaf',       'Chemical-free decaffeinated, nutty and round, 250 g.',                 949, 'EUR',  40, 'coffee',    'images/sku-decaf.svg'),
    ('sku-cold-brew',  'Cold Brew Concentrate',   'Steeped for 18 hours; dilute one to one. 1 litre bottle.',            1299, 'EUR',  25, 'coffee',    'images/sku-cold-brew.svg'),
    ('sku-green-tea',  'Sencha Green Tea',        'Steamed Japanese green tea, grassy and sweet, 100 g loose leaf.',      650, 'EUR',  60, 'tea',       'images/sku-green-tea.svg'),
    ('sku-earl-grey',  'Earl Grey',               'Black tea with bergamot oil, 100 g loose leaf.',                       590, 'EUR',  75, 'tea',       'images/sku-earl-grey.svg'),
    ('sku-chai',       'Masala Chai',             'Black tea with cardamom, ginger and cinnamon, 100 g. Back soon.',     720, 'EUR',   0, 'tea',       'images/sku-chai.svg'),
    ('sku-grinder',    'Conical Burr Grinder',    'Forty grind settings from espresso to cold brew.',                   12900, 'EUR',   8, 'equipment', 'images/sku-grinder.svg'),
    ('sku-kettle',     'Gooseneck Kettle',        'Temperature-controlled pour-over kettle, 0.9 l.',                     5490, 'EUR',  15, 'equipment', 'images/sku-kettle.svg'),
    ('sku-dripper',    'Ceramic Pour-Over Dripper','Single-cup cone dripper, fits size 02 filters.',                     2450, 'EUR',  30, 'equipment', 'images/sku-dripper.svg'),
    ('sku-mug',        'Stoneware Mug',           'Hand-glazed, 300 ml, dishwasher safe.',                               1450, 'EUR', 200, 'merchandise','images/sku-mug.svg'),
    ('sku-croissant',  'Butter Croissant',        'Baked every morning; pairs well with the espresso roast.',             250, 'EUR',  48, 'bakery',    'images/sku-croissant.svg');
