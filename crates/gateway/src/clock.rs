//! The time, read once per poll of a connection's task.
//!
//! A proxied request read the clock about a dozen times on its way
//! through: its deadline, the retry budget's second, the rate limit, the
//! instance's load (twice), the upstream pool (twice), the access log
//! (twice), the connection's idle and head timers. Each reading is a call
//! into the vDSO, which `perf` put at 1.2 % of the gateway's CPU per
//! request, where nginx, which reads the time once per turn of its event
//! loop (`ngx_time_update`), spends 0.07 %. The gateway does as nginx
//! does, per poll of a connection's task: [`Ticking`] reads the clock as
//! each poll begins, and [`now`] returns that reading until the poll ends
//! (and reads the clock itself anywhere else).
//!
//! A poll runs without waiting, so a reading is never older than the poll
//! that uses it has been running: microseconds. Deadlines set from it fall
//! that much early, and durations measured with it are whole polls apart,
//! as nginx's are whole event-loop turns apart.
//!
//! Readings are `tokio::time::Instant`s, so that tests that pause tokio's
//! clock pause these too. [`ticks`] gives the same reading as nanoseconds
//! from a fixed point, a `u64`, for what keeps a time only to subtract it
//! from a later one (a request's duration in the access log, an
//! instance's last activity, a pooled connection's idle time, the retry
//! budget's second): a subtraction of two `Instant`s is a call into std.
//!
//! State that workers share sees their readings out of order: each is as
//! old as its poll, and another worker's newer one can reach a shared lock
//! first. Where time must go forward that is handled there: the in-memory
//! rate limiter reads the clock itself, under its shard's lock
//! (`ratelimit::gcra`), and the retry budget only rolls forward
//! (`resilience`). An instance's last activity and an ejection's end may
//! be a poll early, which their seconds-long windows do not notice.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// A poll's reading, and the same in [`ticks`] once asked for (0 before).
#[derive(Clone, Copy)]
struct Now {
    at: Instant,
    ticks: u64,
}

thread_local! {
    static NOW: Cell<Option<Now>> = const { Cell::new(None) };
}

/// The time as this poll of a connection's task began; outside one, now.
pub(crate) fn now() -> Instant {
    NOW.with(Cell::get).map_or_else(Instant::now, |now| now.at)
}

/// What [`ticks`] count from: a day before the first asked for them, so
/// that every reading taken since the process began (a paused test clock's
/// too, which starts from the real one) counts from it.
static EPOCH: LazyLock<Instant> = LazyLock::new(|| {
    let now = Instant::now();
    now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now)
});

/// [`now`] as nanoseconds from a fixed point: durations and deadlines
/// kept as these are subtracted and compared in an instruction, where
/// each `Instant` subtraction is a call into std (`sub_timespec`, ~37
/// instructions, six or seven times per proxied request:
/// `instructions.sh`). Made once per poll, when first asked for.
pub(crate) fn ticks() -> u64 {
    NOW.with(|cell| match cell.get() {
        Some(now) if now.ticks != 0 => now.ticks,
        Some(Now { at, .. }) => {
            let ticks = ticks_at(at);
            cell.set(Some(Now { at, ticks }));
            ticks
        }
        None => ticks_at(Instant::now()),
    })
}

/// `at` in [`ticks`]; never 0.
pub(crate) fn ticks_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Nanoseconds in a second, and in a millisecond, for [`ticks`].
pub(crate) const SECOND: u64 = 1_000_000_000;
pub(crate) const MILLISECOND: u64 = 1_000_000;

pin_project_lite::pin_project! {
    /// A connection's task, with the clock read once as each poll begins.
    pub(crate) struct Ticking<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Ticking<F> {
    pub(crate) fn new(inner: F) -> Ticking<F> {
        Ticking { inner }
    }
}

impl<F: Future> Future for Ticking<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _reading = Reading::start();
        self.project().inner.poll(cx)
    }
}

/// The reading of one poll; the one before it (if polls nest) comes back
/// when it is dropped, also when the poll panics (tokio catches a task's
/// panic and the thread goes on: a reading left behind would stop its
/// clock).
struct Reading(Option<Now>);

impl Reading {
    fn start() -> Reading {
        let now = Now {
            at: Instant::now(),
            ticks: 0,
        };
        Reading(NOW.with(|cell| cell.replace(Some(now))))
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        NOW.with(|now| now.set(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that, polled once, returns the readings `now` gave at the
    /// start and the end of a poll that took some time.
    async fn two_readings() -> (Instant, Instant) {
        let first = now();
        std::thread::sleep(Duration::from_millis(5));
        (first, now())
    }

    #[tokio::test]
    async fn a_poll_reads_the_clock_once_and_outside_one_it_runs() {
        let before = Instant::now();
        let (first, second) = Ticking::new(two_readings()).await;
        assert_eq!(first, second, "the clock moved within one poll");
        assert!(first >= before);

        // Outside a poll of a ticking task, every reading is fresh.
        let (first, second) = two_readings().await;
        assert!(second >= first + Duration::from_millis(5));
        assert!(NOW.with(Cell::get).is_none(), "a reading outlived its poll");
    }

    #[tokio::test]
    async fn ticks_are_the_polls_reading_and_go_on_with_the_clock() {
        let (first, second, at) = Ticking::new(async {
            let first = ticks();
            std::thread::sleep(Duration::from_millis(5));
            (first, ticks(), now())
        })
        .await;
        assert_eq!(first, second, "the ticks moved within one poll");
        assert_eq!(first, ticks_at(at));
        // Outside a poll, fresh: at least the 5 ms slept later.
        assert!(ticks() >= first + 5 * MILLISECOND);
        assert!(NOW.with(Cell::get).is_none(), "a reading outlived its poll");
    }

    #[tokio::test]
    async fn each_poll_takes_a_new_reading() {
        let readings = Ticking::new(async {
            let first = now();
            std::thread::sleep(Duration::from_millis(5));
            tokio::task::yield_now().await;
            (first, now())
        })
        .await;
        assert!(readings.1 >= readings.0 + Duration::from_millis(5));
    }

    #[test]
    fn a_panicking_poll_leaves_no_reading_behind() {
        let panicked = std::panic::catch_unwind(|| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut ticking = std::pin::pin!(Ticking::new(async { panic!("on purpose") }));
            let _: Poll<()> = ticking.as_mut().poll(&mut cx);
        });
        assert!(panicked.is_err());
        assert!(
            NOW.with(Cell::get).is_none(),
            "a panicking poll left its reading"
        );
    }
}
