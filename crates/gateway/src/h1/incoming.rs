//! A request body still arriving on the connection: the stack reads it as
//! an ordinary `http_body::Body`; the connection task fills it.
//!
//! The two sides share one slot holding at most one frame, so the client is
//! read only as fast as the body is consumed (a bounded channel of one),
//! and each side stores a waker for the other. The consumer may be the
//! connection task itself (an in-task upstream client polls the body from
//! within the stack's future) or another task; both work.
//!
//! The consumer polling for the first time is what lets the connection send
//! `100 Continue`: a request that the stack refuses without looking at its
//! body never makes the client send it.
//!
//! The connection also asks whether the consumer is waiting for a frame
//! ([`Sender::wanted`]): only then is a client that sends nothing keeping
//! the gateway waiting (`body_timeout`, in `h1`). A consumer busy with its
//! last frame (an instance slow to take it) is not, and wakes the
//! connection when it starts to wait.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::body::{BodyStalled, BoxError};

/// Why a streamed request body ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the client closed the connection before the request body was complete")]
    Incomplete,
    #[error(transparent)]
    Malformed(#[from] crate::chunked::ChunkedError),
    #[error("reading the request body failed")]
    Io(#[source] std::io::Error),
    #[error("the connection stopped reading the request body")]
    Abandoned,
    /// The consumer waited `body_timeout` for more, and the client sent
    /// nothing; reaches the consumer as the [`BodyStalled`] itself.
    #[error(transparent)]
    Stalled(#[from] BodyStalled),
}

#[derive(Default)]
struct Slot {
    data: Option<Bytes>,
    /// Set once the body is complete (`Ok`) or failed.
    end: Option<Result<(), BodyError>>,
    /// The consumer, waiting for data.
    reader: Option<Waker>,
    /// The connection, waiting for room, for the first poll, or for the
    /// consumer to wait ([`Sender::wanted`]).
    feeder: Option<Waker>,
    /// The consumer has asked for data at least once.
    polled: bool,
    /// The consumer is gone.
    dropped: bool,
}

type Shared = Arc<Mutex<Slot>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Slot> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A body of `len` bytes (`None`: chunked) fed through the returned
/// [`Sender`].
pub(crate) fn channel(len: Option<u64>) -> (Sender, RequestBody) {
    let shared = Arc::new(Mutex::new(Slot::default()));
    (
        Sender {
            shared: Arc::clone(&shared),
            ended: false,
        },
        RequestBody {
            shared,
            left: len,
            done: false,
        },
    )
}

/// The stack's side.
pub(crate) struct RequestBody {
    shared: Shared,
    /// Bytes still to come, when the length is known.
    left: Option<u64>,
    done: bool,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut slot = lock(&self.shared);
        slot.polled = true;
        if let Some(data) = slot.data.take() {
            let feeder = slot.feeder.take();
            drop(slot);
            if let Some(w) = feeder {
                w.wake();
            }
            if let Some(left) = self.left.as_mut() {
                *left = left.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match slot.end.take() {
            Some(end) => {
                drop(slot);
                self.done = true;
                match end {
                    Ok(()) => Poll::Ready(None),
                    // Unwrapped, for the proxy to find (`body::cause`).
                    Err(BodyError::Stalled(stalled)) => Poll::Ready(Some(Err(Box::new(stalled)))),
                    Err(e) => Poll::Ready(Some(Err(e.into()))),
                }
            }
            None => {
                store(&mut slot.reader, cx);
                // The first poll is the go-ahead for `100 Continue`; after
                // that the connection fills the slot without being asked,
                // and is woken here only when it asked to know that the
                // consumer waits (`Sender::wanted`).
                let feeder = slot.feeder.take();
                drop(slot);
                if let Some(w) = feeder {
                    w.wake();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let mut slot = lock(&self.shared);
        slot.dropped = true;
        slot.data = None;
        let feeder = slot.feeder.take();
        drop(slot);
        if let Some(w) = feeder {
            w.wake();
        }
    }
}

/// What the connection may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// The slot is empty; `polled`: the consumer has asked for data.
    Free { polled: bool },
    /// A frame is waiting to be taken; the caller is woken when it is.
    Full,
    /// The consumer dropped the body.
    Gone,
}

/// The connection's side. Dropping it before [`Sender::finish`] fails the
/// body, so a consumer never waits for a connection that is gone.
pub(crate) struct Sender {
    shared: Shared,
    ended: bool,
}

impl Sender {
    /// Whether a frame can be sent; registers the caller to be woken when
    /// that changes (room freed, first poll, consumer dropped).
    pub(crate) fn room(&self, cx: &Context<'_>) -> Room {
        let mut slot = lock(&self.shared);
        if slot.dropped {
            Room::Gone
        } else if slot.data.is_some() {
            store(&mut slot.feeder, cx);
            Room::Full
        } else {
            if !slot.polled {
                store(&mut slot.feeder, cx);
            }
            Room::Free {
                polled: slot.polled,
            }
        }
    }

    /// Whether the consumer is waiting for a frame: it asked, and the
    /// slot is empty. If not, the caller is woken when it starts to.
    pub(crate) fn wanted(&self, cx: &Context<'_>) -> bool {
        let mut slot = lock(&self.shared);
        if slot.dropped || slot.data.is_some() {
            // Gone, or full: `room` says so, and registers for a change.
            false
        } else if slot.reader.is_some() {
            true
        } else {
            store(&mut slot.feeder, cx);
            false
        }
    }

    /// Whether the consumer dropped the body.
    pub(crate) fn is_gone(&self) -> bool {
        lock(&self.shared).dropped
    }

    /// Hands over one frame; only after [`Room::Free`].
    pub(crate) fn send(&self, data: Bytes) {
        let mut slot = lock(&self.shared);
        slot.data = Some(data);
        let reader = slot.reader.take();
        drop(slot);
        if let Some(w) = reader {
            w.wake();
        }
    }

    pub(crate) fn finish(&mut self, end: Result<(), BodyError>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut slot = lock(&self.shared);
        slot.end = Some(end);
        let reader = slot.reader.take();
        drop(slot);
        if let Some(w) = reader {
            w.wake();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.finish(Err(BodyError::Abandoned));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn frames_flow_one_at_a_time_and_the_end_is_seen() {
        let (mut tx, mut rx) = channel(Some(6));
        let waker = futures_util::task::noop_waker();
        let cx = Context::from_waker(&waker);
        assert_eq!(tx.room(&cx), Room::Free { polled: false });
        assert_eq!(rx.size_hint().exact(), Some(6));
        let reader = tokio::spawn(async move {
            match rx.frame().await {
                Some(Ok(f)) => assert_eq!(f.into_data().ok(), Some(Bytes::from("abc"))),
                _ => panic!("no first frame"),
            }
            assert_eq!(rx.size_hint().exact(), Some(3));
            let rest = match rx.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => panic!("{e}"),
            };
            assert_eq!(rest, Bytes::from("def"));
        });
        // Wait for the reader's first poll, as `100 Continue` does.
        let polled = std::future::poll_fn(|cx| match tx.room(cx) {
            Room::Free { polled: true } => Poll::Ready(()),
            _ => Poll::Pending,
        });
        polled.await;
        tx.send(Bytes::from("abc"));
        std::future::poll_fn(|cx| match tx.room(cx) {
            Room::Full => Poll::Pending,
            _ => Poll::Ready(()),
        })
        .await;
        tx.send(Bytes::from("def"));
        tx.finish(Ok(()));
        if let Err(e) = reader.await {
            panic!("{e}");
        }
    }

    #[tokio::test]
    async fn a_dropped_sender_fails_the_body_and_a_dropped_body_is_seen() {
        let (tx, rx) = channel(None);
        drop(tx);
        assert!(rx.collect().await.is_err());
        let (tx, rx) = channel(None);
        drop(rx);
        let waker = futures_util::task::noop_waker();
        assert_eq!(tx.room(&Context::from_waker(&waker)), Room::Gone);
    }
}
