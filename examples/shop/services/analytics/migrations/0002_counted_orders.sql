-- The orders already counted. An order is confirmed once, but its
-- `order.confirmed` may be published twice (the orders outbox delivers at
-- least once: a relay that dies between the broker's 202 and marking the
-- row sent sends it again), and a stream keeps both copies, at different
-- sequences, so the stream position alone does not tell them apart. One
-- row per confirmed order, written in the transaction that counts it.
CREATE TABLE counted_orders (
    order_id TEXT PRIMARY KEY
);
