//! The seam between the gateway and whatever runs the instances.
//!
//! The gateway does not know about processes: it asks an [`Upstreams`] for
//! the ready instances of a service and, when there are none (a function at
//! zero, or every replica restarting), asks it to activate one and holds the
//! request meanwhile. The runtime implements the trait; tests can implement
//! it over plain listeners.
//!
//! Each instance carries a shared [`Load`]: the gateway counts its in-flight
//! requests there (for power-of-two-choices balancing) and the runtime reads
//! the same counters to autoscale and to stop idle function instances.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One ready instance of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Instance id, e.g. `catalog-0`; shown in logs and headers.
    pub instance: String,
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// Shared in-flight counter and activity clock.
    pub load: Arc<Load>,
}

/// Why no instance could be made ready for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    #[error("service `{0}` is not part of this system")]
    UnknownService(String),
    #[error("no instance of `{service}` became ready: {reason}")]
    Unavailable { service: String, reason: String },
    #[error("the system is shutting down")]
    ShuttingDown,
}

/// A boxed future, so the trait stays object-safe.
pub type ActivateFuture = Pin<Box<dyn Future<Output = Result<(), ActivateError>> + Send + 'static>>;

/// Where the gateway finds instances; implemented by the runtime.
pub trait Upstreams: Send + Sync + 'static {
    /// The instances of `service` that are ready for traffic now. Cheap: the
    /// gateway calls it on every request.
    fn ready(&self, service: &str) -> Arc<[Endpoint]>;

    /// Resolves once `service` has at least one ready instance (starting one
    /// if it is scaled to zero), or fails. The caller bounds the wait with
    /// its own timeout.
    fn activate(&self, service: &str) -> ActivateFuture;
}

/// In-flight requests and last activity of one instance.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` at the last request start or end.
    last_active_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Load {
    /// Counts one request (or connection) until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        LoadGuard(Arc::clone(self))
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Time since a request last started or finished here.
    pub fn idle_for(&self) -> Duration {
        let now = self.elapsed_ms();
        Duration::from_millis(now.saturating_sub(self.last_active_ms.load(Ordering::Acquire)))
    }

    /// Records activity without counting a request: the runtime's L4
    /// service addresses call it as bytes flow, since they cannot see
    /// request boundaries on a kept-alive connection.
    pub fn touch(&self) {
        self.last_active_ms
            .store(self.elapsed_ms(), Ordering::Release);
    }

    fn elapsed_ms(&self) -> u64 {
        let now = crate::clock::now().into_std();
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

/// Ends one unit of load when dropped, however the request ended.
#[derive(Debug)]
pub struct LoadGuard(Arc<Load>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_and_touches() {
        let load = Arc::new(Load::default());
        let a = load.begin();
        let b = load.begin();
        assert_eq!(load.in_flight(), 2);
        drop(a);
        assert_eq!(load.in_flight(), 1);
        drop(b);
        assert_eq!(load.in_flight(), 0);
        assert!(load.idle_for() < Duration::from_secs(1));
    }
}
