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
//! clock pause these too.
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
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

thread_local! {
    static NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time as this poll of a connection's task began; outside one, now.
pub(crate) fn now() -> Instant {
    NOW.with(Cell::get).unwrap_or_else(Instant::now)
}

/// Makes `timer` fire no later than `deadline`. Moving a tokio timer later
/// is cheap and earlier is not, and a connection's deadlines mostly move
/// later (each request's, each body's): so a timer that would fire early
/// is left alone (it is set again when it fires, [`poll_deadline`]), and
/// only one that would fire late, or has fired, is reset. One timer per
/// connection, moved: registering one per wait (and cancelling it) takes
/// the runtime's timer lock twice, which every worker contends for.
pub(crate) fn arm(timer: &mut Pin<Box<Sleep>>, deadline: Instant) {
    if timer.deadline() > deadline || (timer.is_elapsed() && timer.deadline() < deadline) {
        timer.as_mut().reset(deadline);
    }
}

/// Whether `deadline` has passed; if not, `timer` is [`arm`]ed to wake the
/// task by then. One timer may serve several deadlines (a response's
/// stalled body and a request's paused one): each reads the clock first,
/// so a timer moved later on firing early for one does not hide a
/// deadline another passed, as long as each calls this at every poll.
pub(crate) fn poll_deadline(
    timer: &mut Pin<Box<Sleep>>,
    cx: &mut Context<'_>,
    deadline: Instant,
) -> bool {
    if now() >= deadline {
        return true;
    }
    arm(timer, deadline);
    // The timer may fire early (see `arm`): then it is set again.
    while timer.as_mut().poll(cx).is_ready() {
        if Instant::now() >= deadline {
            return true;
        }
        timer.as_mut().reset(deadline);
    }
    false
}

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
struct Reading(Option<Instant>);

impl Reading {
    fn start() -> Reading {
        Reading(NOW.with(|now| now.replace(Some(Instant::now()))))
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
    use std::time::Duration;

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
