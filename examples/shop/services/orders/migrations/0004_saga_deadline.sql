-- The saga's deadline (ORDERS_SAGA_TIMEOUT, src/sweeper.rs): every replica
-- looks, every so often, for the oldest orders still `placed` and cancels
-- those past it (`timed_out`). Partial, so it holds only the orders whose
-- saga is under way: small, whatever the history, and the sweep's query
-- (`status = 'placed' AND created_at < ? ORDER BY created_at LIMIT ?`)
-- reads no more of it than the batch it takes.
CREATE INDEX orders_placed_by_age ON orders (created_at) WHERE status = 'placed';
