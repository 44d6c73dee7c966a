//! Caps on requests in flight: the gateway's own (`[gateway.limits]
//! max_in_flight`, load shedding in `server`) and a route's
//! (`max_in_flight` on a route): a bulkhead, as Envoy's circuit breakers
//! cap `max_requests` per cluster and Resilience4j's bulkhead caps calls
//! per backend. Both are a [`Cap`], as is the count of WebSocket tunnels
//! (`upgrade::Tunnels`).
//!
//! The gateway's `max_in_flight` protects the gateway; it does not protect
//! one service's callers from another service. When a service slows down,
//! its requests pile up in flight (each waits up to its route's timeout),
//! and without a cap of their own they take the gateway's whole allowance,
//! so every other route is shed with them. With a route cap, the slow
//! route's excess is refused at once with 503 and `Retry-After`, and the
//! rest of the system keeps its share.
//!
//! A request holds its place from the moment it is forwarded until its
//! response body has ended (or the client has gone), retries included; a
//! response from the cache takes none, since the service never sees it.
//! The count lives across hot reloads of the route (by the route's
//! identity, as its rate limiter does), so a reload never lets a route
//! have its cap twice over.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::stats;

/// A number of requests in flight at most, and the count of them; clones
/// share the count.
#[derive(Debug, Clone)]
pub(crate) struct Cap {
    limit: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Cap {
    pub(crate) fn new(limit: usize) -> Cap {
        Cap {
            limit,
            in_flight: Arc::default(),
        }
    }

    /// A place for one more request, unless `limit` are in flight.
    pub(crate) fn enter(&self) -> Option<Place> {
        // Taken first and given back when over: a check before the add
        // would let every concurrent request past the same last place.
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let place = Place(Arc::clone(&self.in_flight));
        (before < self.limit).then_some(place)
    }
}

/// A route's cap.
#[derive(Debug)]
pub(crate) struct Bulkhead {
    /// Its count shared with the same route's bulkhead of the
    /// configuration before a reload, whose requests may still be in
    /// flight.
    cap: Cap,
    /// The route's count of requests it refused.
    shed: stats::LazyCounter,
}

/// One request's place within a route's cap, given back when dropped.
#[derive(Debug)]
pub(crate) struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    /// A cap of `limit` for `route`, counting on from `previous` (the same
    /// route's, before a reload) if there was one.
    pub(crate) fn new(limit: usize, route: &str, previous: Option<&Bulkhead>) -> Bulkhead {
        let limit = limit.max(1);
        Bulkhead {
            cap: match previous {
                Some(p) => Cap {
                    limit,
                    in_flight: Arc::clone(&p.cap.in_flight),
                },
                None => Cap::new(limit),
            },
            shed: stats::LazyCounter::route_shed(route),
        }
    }

    /// A place for one more request, unless the route has `limit` in
    /// flight already: then `None`, counted as shed.
    pub(crate) fn enter(&self) -> Option<Place> {
        let place = self.cap.enter();
        if place.is_none() {
            self.shed.increment();
        }
        place
    }

    /// Requests in flight now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.cap.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_limit_is_let_in_under_concurrency_and_places_come_back() {
        let bulkhead = Arc::new(Bulkhead::new(50, "/x", None));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let bulkhead = Arc::clone(&bulkhead);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..25).filter_map(|_| bulkhead.enter()).collect::<Vec<_>>()
                })
            })
            .collect();
        let places: Vec<Place> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        assert_eq!(places.len(), 50, "200 tried, 50 let in");
        assert_eq!(bulkhead.in_flight(), 50);
        assert!(bulkhead.enter().is_none());
        drop(places);
        assert_eq!(bulkhead.in_flight(), 0);
        assert!(bulkhead.enter().is_some());
    }

    #[test]
    fn a_reload_counts_on_from_the_route_s_requests_in_flight() {
        let before = Bulkhead::new(2, "/x", None);
        let held = [before.enter(), before.enter()];
        assert!(held.iter().all(Option::is_some));
        // The new configuration raises the cap by one: one more, not three.
        let after = Bulkhead::new(3, "/x", Some(&before));
        let third = after.enter();
        assert!(third.is_some());
        assert!(after.enter().is_none());
        drop(held);
        assert!(after.enter().is_some());
    }
}
