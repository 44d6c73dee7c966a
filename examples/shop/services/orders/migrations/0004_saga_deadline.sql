-- The saga's deadline (ORDERS_SAGA_TIMEOUT, src/sweeper.rs): every replica
-- looks, every so often, for the oldest orders still `placed` and cancels
-- those past it (`timed_out`). Partial, so it holds only the orders whose
-- saga is under way: small, whatever the history. The sweep reads it in
-- pages by `(created_at, id)` (`status = 'placed' AND created_at < ? AND
-- (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?`), each page
-- no more of it than it takes.
CREATE INDEX orders_placed_by_age ON orders (created_at, id) WHERE status = 'placed';
