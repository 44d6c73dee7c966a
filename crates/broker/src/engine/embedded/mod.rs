//! The embedded engine: queues, topics and streams durable in one redb file.
//!
//! Storage layout and the writer live in [`store`]; this module holds what
//! is in memory and why it is bounded:
//!
//! - per queue, a *cursor*: every stored message at or after it has never
//!   been delivered, so the backlog is read from disk in order and never
//!   indexed in memory;
//! - per queue, the *in-flight* table of delivered, unacknowledged messages
//!   (visibility deadline, receipt token, receive count) with a deadline
//!   heap, capped by `max_in_flight` (SQS's in-flight limit); for FIFO
//!   queues also the messages passed over because their group was busy:
//!   at most [`HELD_PER_GROUP`] per group and `max_in_flight` in all (plus
//!   one receive's worth, read back for a group with nothing in flight), the
//!   rest of a busy group's backlog left on disk behind a per-group marker
//!   and read again when the group drains;
//! - per stream partition, the next sequence number.
//!
//! Receipts are `<seq>-<token>`; the token changes on every delivery, so a
//! receipt from an earlier delivery is stale. In-flight state is not
//! persisted: after a restart, messages that were in flight are delivered
//! again at once (receive counts of redelivered messages are persisted).

mod store;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use store::{Append, Appended, MoveTo, MsgRecord, Op, QMSG, QRECV, SREC, StreamRecord};
pub use store::{FaultInjection, StoreError};

use super::{
    Delivery, Engine, EngineError, Lease, OutgoingMessage, OutgoingRecord, PartitionStats,
    PublishOutcome, QueueStats, ReadResult, Receipt, ReceiveRequest, Record, RecordPosition,
    SendOutcome, StreamPosition, check_delay, check_visibility, now_ms, partition_for,
};
use crate::cloudevent::CloudEvent;
use crate::config::{Durability, EmbeddedConfig, QueueConfig, StreamConfig, Target, Topology};
use crate::filter::FilterPolicy;

/// Operations queued for the writer. Each holds at most one request's data
/// and the byte budget below caps their payloads, so this only bounds the
/// number of waiting requests; beyond it senders wait (backpressure).
const WRITER_QUEUE: usize = 1024;
/// Payload bytes (in KiB permits) of appends waiting for the writer: 64 MiB.
/// Publishers beyond it wait instead of growing memory.
const PENDING_APPEND_KIB: usize = 64 * 1024;
/// Housekeeping cadence: retention/dedup sweeps, dead-letter sweeps, metrics.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often non-durable commits (acks, moves) are made durable in
/// `always` mode, which also lets redb reuse freed pages.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Shared {
    pub queues: Vec<Arc<QueueRt>>,
    pub queue_by_id: HashMap<u32, usize>,
    pub streams: Vec<Arc<StreamRt>>,
    /// A write failed; the writer refuses further work.
    pub failed: AtomicBool,
    /// Earliest due time of a delayed message (ms), `u64::MAX` if none.
    pub next_due: AtomicU64,
    /// Wakes the ticker when an earlier delayed message arrives.
    pub scheduler: Notify,
}

pub(super) struct Counters {
    pub msgs: AtomicU64,
    pub delayed: AtomicU64,
    pub dead_lettered: AtomicU64,
}

pub(super) struct QueueRt {
    pub name: String,
    pub id: u32,
    pub config: QueueConfig,
    pub dead_letter: Option<usize>,
    pub state: Mutex<QueueState>,
    /// Wakes long-polling receivers: new messages, released messages,
    /// unblocked FIFO groups.
    pub notify: Notify,
    pub counters: Counters,
}

pub(super) struct InFlight {
    visible_at: u64,
    token: u64,
    count: u32,
    group: Arc<str>,
    /// A receive-count row exists in the database.
    recv_row: bool,
}

/// A recently appended message kept in memory so that consumers that keep
/// up are served without reading the disk.
pub(super) struct TailMsg {
    pub seq: u64,
    pub group: Arc<str>,
    pub enqueued_ms: u64,
    pub event: Bytes,
}

/// The visibility heap is rebuilt from its live entries once it holds more
/// than twice the in-flight messages plus this many.
const HEAP_SLACK: usize = 1024;

/// FIFO: the most messages of one busy group (one with a message in
/// flight) held in memory behind its head. The rest of its backlog stays on
/// disk, behind the cursor, from a per-group marker on, and is read again
/// (up to this many) once fewer than half are held, so that a stuck group
/// with a large backlog neither fills the queue's memory nor stops the
/// cursor, and other groups keep flowing.
const HELD_PER_GROUP: usize = 256;

/// The most rows a FIFO receive reads from disk while holding the queue
/// lock; one that finds nothing to deliver in them lets go of the lock and
/// goes on.
const SCAN_BUDGET: usize = 4096;

/// The in-memory tail per queue holds at most this many messages...
const TAIL_MESSAGES: usize = 1024;
/// ...and this many bytes; older fresh messages are read from disk.
const TAIL_BYTES: usize = 1 << 20;

pub(super) struct QueueState {
    /// Highest seq known committed.
    pub committed: u64,
    /// Next seq never handed out.
    cursor: u64,
    inflight: HashMap<u64, InFlight>,
    /// (visible at, seq, token); entries whose token no longer matches are
    /// stale and skipped.
    heap: BinaryHeap<Reverse<(u64, u64, u64)>>,
    /// FIFO: messages behind the cursor not yet delivered because their
    /// group had a message in flight: seq → (group, stored receive count).
    /// The count is there after a restart, for a message delivered before
    /// it; dropped, `max_receives` would start over and the count's row
    /// would outlive the message.
    skipped: BTreeMap<u64, (Arc<str>, Option<u32>)>,
    /// FIFO: how many messages of each group are in `skipped`.
    held: HashMap<Arc<str>, usize>,
    /// FIFO: groups whose backlog from this seq on, behind the cursor, is
    /// on disk only (their `skipped` was full): messages of these groups
    /// the cursor passes are left there too, in order, and read back into
    /// `skipped` from the marker when it runs low.
    overflow: HashMap<Arc<str>, u64>,
    next_token: u64,
    /// The newest appended messages, contiguous up to `committed` since
    /// the engine opened (bounded by TAIL_MESSAGES and TAIL_BYTES).
    tail: VecDeque<TailMsg>,
    tail_bytes: usize,
}

impl QueueState {
    pub(super) fn forget(&mut self, seq: u64) {
        self.inflight.remove(&seq);
        self.unhold(seq);
        if let Ok(i) = self.tail.binary_search_by_key(&seq, |m| m.seq)
            && let Some(m) = self.tail.remove(i)
        {
            self.tail_bytes -= m.event.len();
        }
    }

    /// How many messages of `group` are held in `skipped`.
    fn held_of(&self, group: &str) -> usize {
        self.held.get(group).copied().unwrap_or(0)
    }

    fn hold(&mut self, seq: u64, group: Arc<str>, prior: Option<u32>) {
        *self.held.entry(group.clone()).or_default() += 1;
        self.skipped.insert(seq, (group, prior));
    }

    fn unhold(&mut self, seq: u64) -> Option<(Arc<str>, Option<u32>)> {
        let (group, prior) = self.skipped.remove(&seq)?;
        if let Some(n) = self.held.get_mut(&*group) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&*group);
            }
        }
        Some((group, prior))
    }

    pub(super) fn extend_tail(&mut self, msgs: Vec<TailMsg>) {
        for m in msgs {
            self.tail_bytes += m.event.len();
            self.tail.push_back(m);
        }
        self.trim_tail();
    }

    fn pop_tail(&mut self) -> Option<TailMsg> {
        let m = self.tail.pop_front()?;
        self.tail_bytes -= m.event.len();
        Some(m)
    }

    /// Drops what was consumed (below the cursor) and what is over budget.
    fn trim_tail(&mut self) {
        while let Some(front) = self.tail.front() {
            let over = self.tail.len() > TAIL_MESSAGES || self.tail_bytes > TAIL_BYTES;
            if front.seq >= self.cursor && !over {
                break;
            }
            self.pop_tail();
        }
    }

    /// Records a delivery's deadline. Acks and visibility changes leave
    /// the entries they outdate in the heap, and those leave only from its
    /// top: behind one long-held message (the earliest deadline) they
    /// piled up without bound (12 h visibility at 1k msg/s: tens of
    /// millions). Past twice the in-flight count (plus some slack) the
    /// heap keeps only its live entries: amortized O(1) per push.
    fn push_deadline(&mut self, at: u64, seq: u64, token: u64) {
        self.heap.push(Reverse((at, seq, token)));
        if self.heap.len() > 2 * self.inflight.len() + HEAP_SLACK {
            let inflight = &self.inflight;
            self.heap.retain(|&Reverse((at, seq, token))| {
                inflight
                    .get(&seq)
                    .is_some_and(|f| f.token == token && f.visible_at == at)
            });
        }
    }

    fn next_expiry(&mut self) -> Option<u64> {
        while let Some(&Reverse((at, seq, token))) = self.heap.peek() {
            match self.inflight.get(&seq) {
                Some(f) if f.token == token && f.visible_at == at => return Some(at),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }
}

pub(super) struct PartitionRt {
    /// Sequence the next record gets; everything below is committed.
    pub next: AtomicU64,
    pub notify: Notify,
}

pub(super) struct StreamRt {
    pub id: u32,
    pub config: StreamConfig,
    pub partitions: Vec<PartitionRt>,
}

enum RouteTo {
    Queue(usize),
    Stream(usize),
}

struct Inner {
    shared: Arc<Shared>,
    db: RwLock<Option<Arc<Database>>>,
    tx: RwLock<Option<mpsc::Sender<Op>>>,
    pending: Arc<Semaphore>,
    durability: Durability,
    queue_index: HashMap<String, usize>,
    stream_index: HashMap<String, usize>,
    topics: HashMap<String, Vec<(RouteTo, FilterPolicy)>>,
    writer_done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The embedded engine. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedEngine {
    inner: Arc<Inner>,
}

fn store_err(e: StoreError) -> EngineError {
    if e.is_full() {
        EngineError::StorageFull(std::io::Error::from(std::io::ErrorKind::StorageFull))
    } else {
        EngineError::Storage(e)
    }
}

fn parse_receipt(r: &Receipt) -> Result<(u64, u64), EngineError> {
    let bad = || EngineError::InvalidReceipt(r.0.clone());
    let (seq, token) = r.0.split_once('-').ok_or_else(bad)?;
    Ok((
        seq.parse().map_err(|_| bad())?,
        u64::from_str_radix(token, 16).map_err(|_| bad())?,
    ))
}

fn receipt(seq: u64, token: u64) -> Receipt {
    Receipt(format!("{seq}-{token:016x}"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

pub(crate) fn check_member_name(what: &'static str, s: &str) -> Result<(), EngineError> {
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(EngineError::InvalidArgument {
            what,
            problem: "use 1-128 printable ASCII characters without spaces".into(),
        });
    }
    Ok(())
}

impl EmbeddedEngine {
    /// Opens (or creates) the engine's database in `config.dir` and starts
    /// its writer thread and housekeeping task. Must run inside a tokio
    /// runtime.
    pub async fn open(topology: &Topology, config: &EmbeddedConfig) -> Result<Self, EngineError> {
        let config = config.clone();
        let topology = topology.clone();
        let engine = tokio::task::spawn_blocking(move || Self::open_blocking(&topology, &config))
            .await
            .map_err(|_| EngineError::Closed)??;
        let ticker = tokio::spawn(ticker(Arc::downgrade(&engine.inner)));
        if let Ok(mut t) = engine.inner.ticker.lock() {
            *t = Some(ticker);
        }
        Ok(engine)
    }

    fn open_blocking(topology: &Topology, config: &EmbeddedConfig) -> Result<Self, EngineError> {
        let db = store::open_database(
            &config.dir,
            config.cache_bytes,
            config.fault_injection.as_ref(),
        )
        .map_err(store_err)?;
        let queue_names: Vec<String> = topology.queues.keys().cloned().collect();
        let stream_defs: Vec<(String, u32)> = topology
            .streams
            .values()
            .map(|s| (s.name.clone(), s.config.partitions))
            .collect();
        let (queue_ids, stream_ids, state) =
            store::prepare(&db, &queue_names, &stream_defs).map_err(store_err)?;

        let queue_index: HashMap<String, usize> = queue_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let read = db.begin_read().map_err(|e| store_err(e.into()))?;
        let qmsg = read.open_table(QMSG).map_err(|e| store_err(e.into()))?;
        let mut queues = Vec::new();
        let mut first_token: u64 = rand::random::<u32>().into();
        for (i, name) in queue_names.iter().enumerate() {
            let spec = &topology.queues[name];
            let id = queue_ids[i];
            let first = qmsg
                .range((id, 0)..=(id, u64::MAX))
                .map_err(|e| store_err(e.into()))?
                .next()
                .transpose()
                .map_err(|e| store_err(e.into()))?
                .map(|(k, _)| k.value().1);
            let w = &state.queues[i];
            first_token = first_token.wrapping_add(1 << 32);
            queues.push(Arc::new(QueueRt {
                name: name.clone(),
                id,
                config: spec.config.clone(),
                dead_letter: spec
                    .config
                    .dead_letter
                    .as_ref()
                    .and_then(|d| queue_index.get(d).copied()),
                state: Mutex::new(QueueState {
                    committed: w.next_seq - 1,
                    cursor: first.unwrap_or(w.next_seq),
                    inflight: HashMap::new(),
                    heap: BinaryHeap::new(),
                    skipped: BTreeMap::new(),
                    held: HashMap::new(),
                    overflow: HashMap::new(),
                    next_token: first_token,
                    tail: VecDeque::new(),
                    tail_bytes: 0,
                }),
                notify: Notify::new(),
                counters: Counters {
                    msgs: AtomicU64::new(w.msgs),
                    delayed: AtomicU64::new(w.delayed),
                    dead_lettered: AtomicU64::new(w.dead_lettered),
                },
            }));
        }
        drop(qmsg);
        drop(read);
        let streams: Vec<Arc<StreamRt>> = stream_defs
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                Arc::new(StreamRt {
                    id: stream_ids[i],
                    config: topology.streams[name].config.clone(),
                    partitions: state.streams[i]
                        .parts
                        .iter()
                        .map(|&(next, _)| PartitionRt {
                            next: AtomicU64::new(next),
                            notify: Notify::new(),
                        })
                        .collect(),
                })
            })
            .collect();
        let stream_index: HashMap<String, usize> = stream_defs
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let topics = topology
            .topics
            .iter()
            .map(|(name, routes)| {
                let resolved = routes
                    .iter()
                    .filter_map(|r| {
                        let to = match &r.target {
                            Target::Queue(q) => RouteTo::Queue(*queue_index.get(q)?),
                            Target::Stream(s) => RouteTo::Stream(*stream_index.get(s)?),
                        };
                        Some((to, r.filter.clone()))
                    })
                    .collect();
                (name.clone(), resolved)
            })
            .collect();
        let delayed_any = state.queues.iter().any(|q| q.delayed > 0);
        let shared = Arc::new(Shared {
            queue_by_id: queues.iter().enumerate().map(|(i, q)| (q.id, i)).collect(),
            queues,
            streams,
            failed: AtomicBool::new(false),
            // Unknown until the first promotion scans the delayed table.
            next_due: AtomicU64::new(if delayed_any { 0 } else { u64::MAX }),
            scheduler: Notify::new(),
        });
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        store::spawn_writer(
            db.clone(),
            rx,
            shared.clone(),
            state,
            config.durability == Durability::Always,
            done_tx,
        )
        .map_err(|e| {
            EngineError::Storage(StoreError::CreateDir {
                path: config.dir.clone(),
                source: Arc::new(e),
            })
        })?;
        let inner = Arc::new(Inner {
            shared,
            db: RwLock::new(Some(db)),
            tx: RwLock::new(Some(tx)),
            pending: Arc::new(Semaphore::new(PENDING_APPEND_KIB)),
            durability: config.durability,
            queue_index,
            stream_index,
            topics,
            writer_done: tokio::sync::Mutex::new(Some(done_rx)),
            ticker: Mutex::new(None),
        });
        Ok(Self { inner })
    }
}

impl Inner {
    fn sender(&self) -> Result<mpsc::Sender<Op>, EngineError> {
        self.tx
            .read()
            .ok()
            .and_then(|t| t.clone())
            .ok_or(EngineError::Closed)
    }

    fn db(&self) -> Result<Arc<Database>, EngineError> {
        self.db
            .read()
            .ok()
            .and_then(|d| d.clone())
            .ok_or(EngineError::Closed)
    }

    fn queue(&self, name: &str) -> Result<&Arc<QueueRt>, EngineError> {
        self.queue_index
            .get(name)
            .map(|&i| &self.shared.queues[i])
            .ok_or_else(|| EngineError::UnknownQueue(name.to_owned()))
    }

    fn queue_idx(&self, name: &str) -> Result<usize, EngineError> {
        self.queue_index
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::UnknownQueue(name.to_owned()))
    }

    fn stream_idx(&self, name: &str) -> Result<usize, EngineError> {
        self.stream_index
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::UnknownStream(name.to_owned()))
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(make(reply))
            .await
            .map_err(|_| EngineError::Closed)?;
        rx.await
            .map_err(|_| store_err(StoreError::WriterGone))?
            .map_err(store_err)
    }

    async fn append(&self, items: Vec<Append>, bytes: usize) -> Result<Vec<Appended>, EngineError> {
        let kib = (bytes / 1024 + 1).min(PENDING_APPEND_KIB) as u32;
        let _permit = self
            .pending
            .acquire_many(kib)
            .await
            .map_err(|_| EngineError::Closed)?;
        let durable = true;
        self.request(|reply| Op::Append {
            items,
            durable,
            reply,
        })
        .await
    }

    fn queue_append(
        &self,
        q: usize,
        event: &CloudEvent,
        delay: Option<Duration>,
        now: u64,
    ) -> Result<Append, EngineError> {
        let cfg = &self.shared.queues[q].config;
        let (group, dedup) = if cfg.fifo {
            (
                super::checked_key(
                    event.key(&cfg.group_attribute).unwrap_or_default(),
                    &cfg.group_attribute,
                )?,
                Some(event.dedup_key()),
            )
        } else {
            (String::new(), None)
        };
        Ok(Append::Queue {
            queue: q,
            event: event.as_bytes().clone(),
            group,
            dedup,
            delay_ms: ms(delay.unwrap_or(cfg.delay)),
            now,
        })
    }

    fn stream_append(
        &self,
        s: usize,
        event: &CloudEvent,
        key: Option<String>,
        now: u64,
    ) -> Result<Append, EngineError> {
        let rt = &self.shared.streams[s];
        let key = super::stream_key(key, event, &rt.config.partition_key)?;
        Ok(Append::Stream {
            stream: s,
            partition: partition_for(&key, rt.config.partitions),
            key,
            event: event.as_bytes().clone(),
            now,
        })
    }

    /// A receive served from memory: new messages from the tail, for a
    /// standard queue with no delivery to repeat. `None`: the disk is needed.
    fn try_receive_fast(
        &self,
        qi: usize,
        max: usize,
        visibility: u64,
    ) -> Result<Option<Vec<Delivery>>, EngineError> {
        let q = &self.shared.queues[qi];
        if q.config.fifo {
            return Ok(None);
        }
        let now = now_ms();
        let mut st = q.state.lock().map_err(|_| EngineError::Closed)?;
        let st = &mut *st;
        if st.next_expiry().is_some_and(|at| at <= now) {
            return Ok(None);
        }
        st.trim_tail();
        if st.cursor <= st.committed && st.tail.front().is_none_or(|m| m.seq > st.cursor) {
            return Ok(None);
        }
        let mut out = Vec::new();
        while out.len() < max
            && st.inflight.len() < q.config.max_in_flight
            && st.cursor <= st.committed
        {
            let Some(m) = st.pop_tail() else { break };
            st.cursor = m.seq + 1;
            let token = st.next_token;
            st.next_token = st.next_token.wrapping_add(1);
            let visible_at = now + visibility;
            st.inflight.insert(
                m.seq,
                InFlight {
                    visible_at,
                    token,
                    count: 1,
                    group: m.group,
                    recv_row: false,
                },
            );
            st.push_deadline(visible_at, m.seq, token);
            out.push(Delivery {
                receipt: receipt(m.seq, token),
                message_id: m.seq.to_string(),
                receive_count: 1,
                sent_at_ms: m.enqueued_ms,
                event: m.event,
            });
        }
        Ok(Some(out))
    }

    /// The blocking half of a receive: picks messages under the queue lock,
    /// reading new ones from disk at the cursor. Also says whether it
    /// stopped reading the disk on [`SCAN_BUDGET`] with rows left to read
    /// (call again before waiting).
    fn try_receive(
        &self,
        qi: usize,
        max: usize,
        visibility: u64,
        one_per_group: bool,
    ) -> Result<(Vec<Delivery>, bool), EngineError> {
        let q = &self.shared.queues[qi];
        let db = self.db()?;
        let max_receives = q.config.max_receives;
        let now = now_ms();

        // (seq, previous count, group, had recv row, (event, enqueued) if read)
        #[allow(clippy::type_complexity)]
        let mut picks: Vec<(u64, u32, Arc<str>, bool, Option<(Bytes, u64)>)> = Vec::new();
        let mut dead = Vec::new();
        let mut counts = Vec::new();
        let mut out = Vec::new();
        let cap = q.config.max_in_flight;
        let mut budget = SCAN_BUDGET;
        let mut more = false;
        {
            let mut st = q.state.lock().map_err(|_| EngineError::Closed)?;
            let st = &mut *st;
            // The snapshot must start after `committed` was read (under the
            // lock the writer takes to raise it), or it could miss messages
            // the cursor then skips.
            let read = db.begin_read().map_err(|e| store_err(e.into()))?;
            let qmsg = read.open_table(QMSG).map_err(|e| store_err(e.into()))?;
            let qrecv = read.open_table(QRECV).map_err(|e| store_err(e.into()))?;
            let mut blocked: HashSet<Arc<str>> = HashSet::new();
            if q.config.fifo {
                // Groups whose backlog is on disk and runs low in memory:
                // read the next of it back, in order, from their markers.
                let low: Vec<(Arc<str>, u64)> = st
                    .overflow
                    .iter()
                    .filter(|(g, _)| st.held_of(g) < HELD_PER_GROUP / 2)
                    .map(|(g, &from)| (g.clone(), from))
                    .collect();
                // Past the cap on what is held, a group with nothing in
                // flight is still read back, as much as this receive can
                // take: its messages go out now rather than stay held, so
                // groups stuck behind their heads, however many, cannot
                // keep it waiting on disk.
                let busy: HashSet<Arc<str>> =
                    st.inflight.values().map(|f| f.group.clone()).collect();
                for (group, from) in low {
                    if budget == 0 {
                        more = true;
                        break;
                    }
                    let limit = if busy.contains(&group) {
                        cap
                    } else {
                        cap + max
                    };
                    if st.skipped.len() >= limit {
                        continue;
                    }
                    let mut next = None;
                    for row in qmsg
                        .range((q.id, from)..(q.id, st.cursor))
                        .map_err(|e| store_err(e.into()))?
                    {
                        let (k, v) = row.map_err(|e| store_err(e.into()))?;
                        let seq = k.value().1;
                        budget -= 1;
                        let rec = MsgRecord::decode(v.value()).map_err(store_err)?;
                        if rec.group == &*group {
                            let prior = qrecv
                                .get((q.id, seq))
                                .map_err(|e| store_err(e.into()))?
                                .map(|c| c.value());
                            if max_receives.is_some_and(|m| prior.unwrap_or(0) >= m) {
                                dead.push(seq);
                            } else {
                                st.hold(seq, group.clone(), prior);
                            }
                        }
                        if st.held_of(&group) >= HELD_PER_GROUP
                            || st.skipped.len() >= limit
                            || budget == 0
                        {
                            next = Some(seq + 1);
                            break;
                        }
                    }
                    // Out of budget before the group's next message: the
                    // receive goes on (releasing the lock between) rather
                    // than sleeping its wait with messages deliverable.
                    if budget == 0 {
                        more = true;
                    }
                    match next {
                        Some(n) => {
                            st.overflow.insert(group, n);
                        }
                        // Read up to the cursor: all of it is held now.
                        None => {
                            st.overflow.remove(&group);
                        }
                    }
                }
                for f in st.inflight.values() {
                    if f.visible_at > now {
                        blocked.insert(f.group.clone());
                    }
                }
                let mut cands: Vec<(u64, Arc<str>, bool)> = st
                    .inflight
                    .iter()
                    .filter(|(_, f)| f.visible_at <= now)
                    .map(|(&s, f)| (s, f.group.clone(), true))
                    .chain(st.skipped.iter().map(|(&s, (g, _))| (s, g.clone(), false)))
                    .collect();
                cands.sort_unstable_by_key(|c| c.0);
                for (seq, group, in_flight) in cands {
                    if picks.len() >= max {
                        break;
                    }
                    if blocked.contains(&group) {
                        continue;
                    }
                    if in_flight {
                        let Some(f) = st.inflight.get(&seq) else {
                            continue;
                        };
                        if max_receives.is_some_and(|m| f.count >= m) {
                            st.inflight.remove(&seq);
                            dead.push(seq);
                            continue;
                        }
                        picks.push((seq, f.count, group.clone(), f.recv_row, None));
                    } else if let Some((_, prior)) = st.unhold(seq) {
                        picks.push((
                            seq,
                            prior.unwrap_or(0),
                            group.clone(),
                            prior.is_some(),
                            None,
                        ));
                    }
                    if one_per_group {
                        blocked.insert(group);
                    }
                }
            } else {
                while picks.len() < max {
                    let Some(&Reverse((at, seq, token))) = st.heap.peek() else {
                        break;
                    };
                    if at > now {
                        break;
                    }
                    st.heap.pop();
                    let Some(f) = st.inflight.get(&seq) else {
                        continue;
                    };
                    if f.token != token || f.visible_at != at {
                        continue;
                    }
                    if max_receives.is_some_and(|m| f.count >= m) {
                        st.inflight.remove(&seq);
                        dead.push(seq);
                        continue;
                    }
                    picks.push((seq, f.count, f.group.clone(), f.recv_row, None));
                }
            }
            // New messages from disk, while under the in-flight cap. What
            // is held for busy groups does not stop the cursor: it is
            // bounded per group, and beyond that left on disk.
            if picks.len() < max
                && budget > 0
                && st.cursor <= st.committed
                && st.inflight.len() < cap
            {
                let range = qmsg
                    .range((q.id, st.cursor)..=(q.id, st.committed))
                    .map_err(|e| store_err(e.into()))?;
                let mut exhausted = true;
                for row in range {
                    let (k, v) = row.map_err(|e| store_err(e.into()))?;
                    let seq = k.value().1;
                    let rec = MsgRecord::decode(v.value()).map_err(store_err)?;
                    let prior = qrecv
                        .get((q.id, seq))
                        .map_err(|e| store_err(e.into()))?
                        .map(|c| c.value());
                    st.cursor = seq + 1;
                    if max_receives.is_some_and(|m| prior.unwrap_or(0) >= m) {
                        dead.push(seq);
                        // A row read all the same: counted in the budget.
                        budget = budget.saturating_sub(1);
                        if budget == 0 {
                            exhausted = false;
                            more |= st.cursor <= st.committed;
                            break;
                        }
                        continue;
                    }
                    if q.config.fifo && st.overflow.contains_key(rec.group) {
                        // Part of the group's backlog left on disk (its
                        // marker is before it): read back in order later.
                    } else if q.config.fifo && blocked.contains(rec.group) {
                        if st.held_of(rec.group) >= HELD_PER_GROUP || st.skipped.len() >= cap {
                            st.overflow.insert(Arc::from(rec.group), seq);
                        } else {
                            st.hold(seq, Arc::from(rec.group), prior);
                        }
                    } else {
                        let group: Arc<str> = Arc::from(rec.group);
                        if q.config.fifo && one_per_group {
                            blocked.insert(group.clone());
                        }
                        picks.push((
                            seq,
                            prior.unwrap_or(0),
                            group,
                            prior.is_some(),
                            Some((Bytes::copy_from_slice(rec.event), rec.enqueued_ms)),
                        ));
                    }
                    budget = budget.saturating_sub(1);
                    if picks.len() >= max || st.inflight.len() + picks.len() >= cap {
                        exhausted = false;
                        break;
                    }
                    if budget == 0 {
                        exhausted = false;
                        more |= st.cursor <= st.committed;
                        break;
                    }
                }
                if exhausted {
                    st.cursor = st.committed + 1;
                }
            }
            for (seq, prior, group, recv_row, bytes) in picks {
                let (event, sent_at_ms) = match bytes {
                    Some(b) => b,
                    None => {
                        // A redelivery: read it again (it may have expired).
                        let Some(v) = qmsg.get((q.id, seq)).map_err(|e| store_err(e.into()))?
                        else {
                            st.inflight.remove(&seq);
                            continue;
                        };
                        let rec = MsgRecord::decode(v.value()).map_err(store_err)?;
                        (Bytes::copy_from_slice(rec.event), rec.enqueued_ms)
                    }
                };
                let token = st.next_token;
                st.next_token = st.next_token.wrapping_add(1);
                let count = prior + 1;
                let visible_at = now + visibility;
                if count >= 2 {
                    counts.push((seq, count));
                }
                st.inflight.insert(
                    seq,
                    InFlight {
                        visible_at,
                        token,
                        count,
                        group,
                        recv_row: recv_row || count >= 2,
                    },
                );
                st.push_deadline(visible_at, seq, token);
                out.push(Delivery {
                    receipt: receipt(seq, token),
                    message_id: seq.to_string(),
                    receive_count: count,
                    sent_at_ms,
                    event,
                });
            }
        }
        let tx = self.sender()?;
        if !counts.is_empty() {
            tx.blocking_send(Op::RecordReceives { queue: qi, counts })
                .map_err(|_| EngineError::Closed)?;
        }
        if !dead.is_empty() {
            let to = q.dead_letter.map_or(MoveTo::Drop, MoveTo::Queue);
            tracing::info!(queue = %q.name, count = dead.len(), "max_receives reached; dead-lettering");
            tx.blocking_send(Op::Move {
                queue: qi,
                seqs: dead,
                to,
                reply: None,
            })
            .map_err(|_| EngineError::Closed)?;
        }
        Ok((out, more))
    }

    /// Dead-letters expired deliveries that used up `max_receives`, without
    /// waiting for a receive to find them.
    fn sweep_dead_letters(&self, qi: usize) -> Option<Op> {
        let q = &self.shared.queues[qi];
        let max = q.config.max_receives?;
        let now = now_ms();
        let mut st = q.state.lock().ok()?;
        let mut dead = Vec::new();
        let mut keep = Vec::new();
        while let Some(&Reverse((at, seq, token))) = st.heap.peek() {
            if at > now {
                break;
            }
            st.heap.pop();
            match st.inflight.get(&seq) {
                Some(f) if f.token == token && f.visible_at == at => {
                    if f.count >= max {
                        st.inflight.remove(&seq);
                        dead.push(seq);
                    } else {
                        keep.push(Reverse((at, seq, token)));
                    }
                }
                _ => {}
            }
        }
        st.heap.extend(keep);
        drop(st);
        (!dead.is_empty()).then(|| Op::Move {
            queue: qi,
            seqs: dead,
            to: q.dead_letter.map_or(MoveTo::Drop, MoveTo::Queue),
            reply: None,
        })
    }

    fn read_blocking(
        &self,
        si: usize,
        partition: u32,
        from: StreamPosition,
        limit: usize,
    ) -> Result<ReadResult, EngineError> {
        let s = &self.shared.streams[si];
        let part = &s.partitions[partition as usize];
        let next = part.next.load(Ordering::SeqCst);
        let db = self.db()?;
        let read = db.begin_read().map_err(|e| store_err(e.into()))?;
        let srec = read.open_table(SREC).map_err(|e| store_err(e.into()))?;
        let err = |e: redb::StorageError| store_err(e.into());
        let first = srec
            .range((s.id, partition, 0)..(s.id, partition, next))
            .map_err(err)?
            .next()
            .transpose()
            .map_err(err)?
            .map_or(next, |(k, _)| k.value().2);
        let start = match from {
            StreamPosition::TrimHorizon => first,
            StreamPosition::Latest => next,
            StreamPosition::AtSequence(n) => n.max(first),
            StreamPosition::AfterSequence(n) => n.saturating_add(1).max(first),
            StreamPosition::AtTimestamp(t) => {
                let (mut lo, mut hi) = (first, next);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    let ts = match srec.get((s.id, partition, mid)).map_err(err)? {
                        Some(v) => StreamRecord::decode(v.value()).map_err(store_err)?.ts_ms,
                        None => 0,
                    };
                    if ts < t {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                lo
            }
        };
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut resume = start.min(next);
        if start < next {
            for row in srec
                .range((s.id, partition, start)..(s.id, partition, next))
                .map_err(err)?
                .take(limit)
            {
                let (k, v) = row.map_err(err)?;
                let sequence = k.value().2;
                let rec = StreamRecord::decode(v.value()).map_err(store_err)?;
                bytes = bytes.saturating_add(rec.event.len());
                if !records.is_empty() && bytes > super::MAX_READ_BYTES {
                    break;
                }
                records.push(Record {
                    partition,
                    sequence,
                    timestamp_ms: rec.ts_ms,
                    partition_key: rec.key.to_owned(),
                    event: Bytes::copy_from_slice(rec.event),
                });
                resume = sequence + 1;
            }
        }
        Ok(ReadResult {
            records,
            next: StreamPosition::AtSequence(resume.max(start.min(next))),
        })
    }
}

/// Says, loudly, what a failed durable commit of the ticker loses: the
/// engine refuses writes from now on and redb drops the commits made since
/// the last durable one when it is reopened.
fn flush_failed(durability: Durability, e: &EngineError) {
    let cause = std::error::Error::source(e).map(ToString::to_string);
    match durability {
        Durability::Interval(d) => tracing::error!(
            error = %e,
            cause,
            interval = ?d,
            "broker: the periodic durable commit failed (Durability::Interval); publishes acknowledged since the last durable commit (up to one interval) are not on disk and will be LOST when the broker restarts, as will acks and moves since then (redelivered); writes are refused until the restart; free disk space and restart the broker"
        ),
        Durability::Always => tracing::error!(
            error = %e,
            cause,
            "broker: the periodic durable commit failed; acks, receive counts and moves since the last durable commit are not on disk and are undone when the broker restarts (those messages are delivered again); every acknowledged publish is on disk; writes are refused until the restart"
        ),
    }
}

/// Housekeeping: promotes due delayed messages, sweeps dead letters,
/// retention and dedup entries, and flushes non-durable commits.
async fn ticker(weak: Weak<Inner>) {
    let mut last_sweep = tokio::time::Instant::now();
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let (wait, flush_every) = {
            let Some(inner) = weak.upgrade() else { return };
            let due = inner.shared.next_due.load(Ordering::SeqCst);
            let now = now_ms();
            let until_due = Duration::from_millis(due.saturating_sub(now));
            let flush_every = match inner.durability {
                Durability::Always => FLUSH_EVERY,
                Durability::Interval(d) => d,
            };
            (until_due.min(flush_every).min(SWEEP_EVERY), flush_every)
        };
        if !wait.is_zero() {
            // Hold only the shared state while waiting, not the engine.
            let Some(shared) = weak.upgrade().map(|i| i.shared.clone()) else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.scheduler.notified() => {}
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.shared.failed.load(Ordering::SeqCst) {
            tokio::time::sleep(SWEEP_EVERY).await;
            continue;
        }
        let now = now_ms();
        if inner.shared.next_due.load(Ordering::SeqCst) <= now {
            loop {
                match inner.request(|reply| Op::Promote { now, reply }).await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(_) => break,
                }
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            for qi in 0..inner.shared.queues.len() {
                if let Some(op) = inner.sweep_dead_letters(qi)
                    && let Ok(tx) = inner.sender()
                {
                    let _ = tx.send(op).await;
                }
            }
            while let Ok(true) = inner.request(|reply| Op::Sweep { now, reply }).await {}
        }
        if last_flush.elapsed() >= flush_every {
            last_flush = tokio::time::Instant::now();
            if let Err(e @ (EngineError::StorageFull(_) | EngineError::Storage(_))) =
                inner.request(|reply| Op::Flush { reply }).await
            {
                flush_failed(inner.durability, &e);
            }
        }
    }
}

#[async_trait]
impl Engine for EmbeddedEngine {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<PublishOutcome>, EngineError> {
        let inner = &self.inner;
        let routes = inner
            .topics
            .get(topic)
            .ok_or_else(|| EngineError::UnknownTopic(topic.to_owned()))?;
        let now = now_ms();
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut outcomes = Vec::with_capacity(events.len());
        for event in &events {
            let mut routed = 0;
            for (to, filter) in routes {
                if !filter.matches(event) {
                    continue;
                }
                routed += 1;
                bytes += event.as_bytes().len();
                items.push(match to {
                    RouteTo::Queue(q) => inner.queue_append(*q, event, None, now)?,
                    RouteTo::Stream(s) => inner.stream_append(*s, event, None, now)?,
                });
            }
            outcomes.push(PublishOutcome { routed });
        }
        if !items.is_empty() {
            inner.append(items, bytes).await?;
        }
        Ok(outcomes)
    }

    async fn send(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<SendOutcome>, EngineError> {
        let inner = &self.inner;
        let qi = inner.queue_idx(queue)?;
        let now = now_ms();
        let mut bytes = 0;
        let mut items = Vec::with_capacity(messages.len());
        for m in &messages {
            check_delay(m.delay)?;
            bytes += m.event.as_bytes().len();
            items.push(inner.queue_append(qi, &m.event, m.delay, now)?);
        }
        let out = inner.append(items, bytes).await?;
        Ok(out
            .into_iter()
            .filter_map(|a| match a {
                Appended::Queue { id, duplicate } => Some(SendOutcome {
                    message_id: id,
                    duplicate,
                }),
                Appended::Stream { .. } => None,
            })
            .collect())
    }

    async fn receive(
        &self,
        queue: &str,
        request: ReceiveRequest,
    ) -> Result<Vec<Delivery>, EngineError> {
        request.check()?;
        let qi = self.inner.queue_idx(queue)?;
        let q = self.inner.shared.queues[qi].clone();
        let visibility = ms(request
            .visibility_timeout
            .unwrap_or(q.config.visibility_timeout));
        let deadline = tokio::time::Instant::now() + request.wait;
        loop {
            let notified = q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let max = request.max_messages;
            let (got, more) = match self.inner.try_receive_fast(qi, max, visibility)? {
                Some(got) => (got, false),
                None => {
                    let inner = self.inner.clone();
                    let one_per_group = request.one_per_group;
                    tokio::task::spawn_blocking(move || {
                        inner.try_receive(qi, max, visibility, one_per_group)
                    })
                    .await
                    .map_err(|_| EngineError::Closed)??
                }
            };
            let now = tokio::time::Instant::now();
            if !got.is_empty() || (now >= deadline && !more) {
                return Ok(got);
            }
            if more {
                // The disk scan stopped on its budget (the lock was let go
                // for others meanwhile): go on before waiting.
                continue;
            }
            // Sleep until something is published, released or acked (FIFO),
            // or an in-flight message becomes visible again.
            let expiry = q
                .state
                .lock()
                .map_err(|_| EngineError::Closed)?
                .next_expiry();
            let mut wake = deadline;
            if let Some(at) = expiry {
                let until = Duration::from_millis(at.saturating_sub(now_ms()));
                wake = wake.min(now + until);
            }
            let _ = tokio::time::timeout_at(wake, notified).await;
        }
    }

    async fn ack(
        &self,
        queue: &str,
        receipts: &[Receipt],
    ) -> Result<Vec<Result<(), EngineError>>, EngineError> {
        let inner = &self.inner;
        let qi = inner.queue_idx(queue)?;
        let q = &inner.shared.queues[qi];
        let mut results = Vec::with_capacity(receipts.len());
        let mut seqs = Vec::new();
        {
            let mut st = q.state.lock().map_err(|_| EngineError::Closed)?;
            for r in receipts {
                let res = parse_receipt(r).and_then(|(seq, token)| match st.inflight.get(&seq) {
                    Some(f) if f.token == token => {
                        seqs.push((seq, f.recv_row));
                        st.inflight.remove(&seq);
                        Ok(())
                    }
                    _ => Err(EngineError::StaleReceipt),
                });
                results.push(res);
            }
        }
        if q.config.fifo && !seqs.is_empty() {
            // A group may be free now.
            q.notify.notify_waiters();
        }
        if !seqs.is_empty() {
            inner
                .request(|reply| Op::Delete {
                    queue: qi,
                    seqs,
                    reply,
                })
                .await?;
        }
        Ok(results)
    }

    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &Receipt,
        timeout: Duration,
    ) -> Result<Receipt, EngineError> {
        check_visibility(timeout)?;
        let q = self.inner.queue(queue)?;
        let (seq, token) = parse_receipt(receipt)?;
        let mut st = q.state.lock().map_err(|_| EngineError::Closed)?;
        let visible_at = now_ms() + ms(timeout);
        match st.inflight.get_mut(&seq) {
            Some(f) if f.token == token => f.visible_at = visible_at,
            _ => return Err(EngineError::StaleReceipt),
        }
        st.push_deadline(visible_at, seq, token);
        drop(st);
        q.notify.notify_waiters();
        Ok(receipt.clone())
    }

    async fn dead_letter(&self, queue: &str, receipt: &Receipt) -> Result<(), EngineError> {
        let inner = &self.inner;
        let qi = inner.queue_idx(queue)?;
        let q = &inner.shared.queues[qi];
        let (seq, token) = parse_receipt(receipt)?;
        {
            let mut st = q.state.lock().map_err(|_| EngineError::Closed)?;
            match st.inflight.get(&seq) {
                Some(f) if f.token == token => {
                    st.inflight.remove(&seq);
                }
                _ => return Err(EngineError::StaleReceipt),
            }
        }
        if q.config.fifo {
            q.notify.notify_waiters();
        }
        let to = q.dead_letter.map_or(MoveTo::Drop, MoveTo::Queue);
        inner
            .request(|reply| Op::Move {
                queue: qi,
                seqs: vec![seq],
                to,
                reply: Some(reply),
            })
            .await?;
        Ok(())
    }

    async fn redrive(&self, dead_letter_queue: &str, max: usize) -> Result<u64, EngineError> {
        let inner = self.inner.clone();
        let qi = inner.queue_idx(dead_letter_queue)?;
        let seqs = tokio::task::spawn_blocking(move || -> Result<Vec<u64>, EngineError> {
            let q = &inner.shared.queues[qi];
            let db = inner.db()?;
            let now = now_ms();
            let mut st = q.state.lock().map_err(|_| EngineError::Closed)?;
            // After the lock: see the comment in `try_receive`.
            let read = db.begin_read().map_err(|e| store_err(e.into()))?;
            let qmsg = read.open_table(QMSG).map_err(|e| store_err(e.into()))?;
            // The oldest first: taken in map order, a group's later
            // message could go in one call and its earlier in the next.
            let mut seqs: Vec<u64> = st
                .inflight
                .iter()
                .filter(|(_, f)| f.visible_at <= now)
                .map(|(&s, _)| s)
                .collect();
            seqs.sort_unstable();
            seqs.truncate(max);
            for s in &seqs {
                st.inflight.remove(s);
            }
            let skipped: Vec<u64> = st.skipped.keys().copied().take(max - seqs.len()).collect();
            for s in skipped {
                st.unhold(s);
                seqs.push(s);
            }
            // FIFO backlogs left on disk behind the cursor (see
            // `QueueState::overflow`), oldest first.
            if seqs.len() < max
                && let Some(from) = st.overflow.values().min().copied()
            {
                let mut stop = st.cursor;
                for row in qmsg
                    .range((q.id, from)..(q.id, st.cursor))
                    .map_err(|e| store_err(e.into()))?
                {
                    let (k, v) = row.map_err(|e| store_err(e.into()))?;
                    let seq = k.value().1;
                    if seqs.len() >= max {
                        stop = seq;
                        break;
                    }
                    let rec = MsgRecord::decode(v.value()).map_err(store_err)?;
                    if st.overflow.get(rec.group).is_some_and(|&m| m <= seq) {
                        seqs.push(seq);
                    }
                }
                // Every left-behind message before `stop` was taken.
                let cursor = st.cursor;
                st.overflow.retain(|_, m| {
                    *m = (*m).max(stop);
                    *m < cursor
                });
            }
            if seqs.len() < max && st.cursor <= st.committed {
                let mut exhausted = true;
                for row in qmsg
                    .range((q.id, st.cursor)..=(q.id, st.committed))
                    .map_err(|e| store_err(e.into()))?
                {
                    let (k, _) = row.map_err(|e| store_err(e.into()))?;
                    let seq = k.value().1;
                    seqs.push(seq);
                    st.cursor = seq + 1;
                    if seqs.len() >= max {
                        exhausted = false;
                        break;
                    }
                }
                if exhausted {
                    st.cursor = st.committed + 1;
                }
            }
            // Moved in the order they were published: taken from the
            // in-flight table (in map order), what is held and what is on
            // disk, a group's messages would otherwise land out of order.
            seqs.sort_unstable();
            Ok(seqs)
        })
        .await
        .map_err(|_| EngineError::Closed)??;
        if seqs.is_empty() {
            return Ok(0);
        }
        self.inner
            .request(|reply| Op::Move {
                queue: qi,
                seqs,
                to: MoveTo::Redrive { now: now_ms() },
                reply: Some(reply),
            })
            .await
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, EngineError> {
        let q = self.inner.queue(queue)?;
        let now = now_ms();
        let in_flight = q
            .state
            .lock()
            .map_err(|_| EngineError::Closed)?
            .inflight
            .values()
            .filter(|f| f.visible_at > now)
            .count() as u64;
        let msgs = q.counters.msgs.load(Ordering::Relaxed);
        Ok(QueueStats {
            ready: msgs.saturating_sub(in_flight),
            in_flight,
            delayed: q.counters.delayed.load(Ordering::Relaxed),
            dead_lettered: q.counters.dead_lettered.load(Ordering::Relaxed),
        })
    }

    async fn put_records(
        &self,
        stream: &str,
        records: Vec<OutgoingRecord>,
    ) -> Result<Vec<RecordPosition>, EngineError> {
        let inner = &self.inner;
        let si = inner.stream_idx(stream)?;
        let now = now_ms();
        let mut bytes = 0;
        let items = records
            .into_iter()
            .map(|r| {
                bytes += r.event.as_bytes().len();
                inner.stream_append(si, &r.event, r.partition_key, now)
            })
            .collect::<Result<Vec<Append>, EngineError>>()?;
        let out = inner.append(items, bytes).await?;
        Ok(out
            .into_iter()
            .filter_map(|a| match a {
                Appended::Stream {
                    partition,
                    sequence,
                } => Some(RecordPosition {
                    partition,
                    sequence,
                }),
                Appended::Queue { .. } => None,
            })
            .collect())
    }

    async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: StreamPosition,
        limit: usize,
        wait: Duration,
    ) -> Result<ReadResult, EngineError> {
        let si = self.inner.stream_idx(stream)?;
        let s = self.inner.shared.streams[si].clone();
        let Some(part) = s.partitions.get(partition as usize) else {
            return Err(EngineError::UnknownPartition {
                stream: stream.to_owned(),
                partition,
            });
        };
        if limit == 0 || limit > 10_000 {
            return Err(EngineError::InvalidArgument {
                what: "limit",
                problem: format!("{limit} is out of range; use 1 to 10000"),
            });
        }
        let deadline = tokio::time::Instant::now() + wait.min(crate::config::MAX_WAIT);
        let mut from = from;
        loop {
            let notified = part.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let inner = self.inner.clone();
            let result = tokio::task::spawn_blocking(move || {
                inner.read_blocking(si, partition, from, limit)
            })
            .await
            .map_err(|_| EngineError::Closed)??;
            if !result.records.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(result);
            }
            // `latest` means "after what exists now", not "after whatever
            // exists when the wait ends".
            from = result.next;
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    async fn acquire_leases(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<Vec<Lease>, EngineError> {
        check_member_name("group", group)?;
        check_member_name("consumer", consumer)?;
        let si = self.inner.stream_idx(stream)?;
        let (group, consumer) = (group.to_owned(), consumer.to_owned());
        self.inner
            .request(|reply| Op::Acquire {
                stream: si,
                group,
                consumer,
                ttl_ms: ms(ttl).max(1),
                now: now_ms(),
                reply,
            })
            .await
    }

    async fn checkpoint(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        lease: &Lease,
        sequence: u64,
    ) -> Result<(), EngineError> {
        let si = self.inner.stream_idx(stream)?;
        if lease.partition >= self.inner.shared.streams[si].config.partitions {
            return Err(EngineError::UnknownPartition {
                stream: stream.to_owned(),
                partition: lease.partition,
            });
        }
        let ok = self
            .inner
            .request(|reply| Op::Checkpoint {
                stream: si,
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                partition: lease.partition,
                token: lease.token,
                sequence,
                now: now_ms(),
                reply,
            })
            .await?;
        if ok {
            Ok(())
        } else {
            Err(EngineError::LeaseLost {
                stream: stream.to_owned(),
                group: group.to_owned(),
                partition: lease.partition,
            })
        }
    }

    async fn leave_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<(), EngineError> {
        let si = self.inner.stream_idx(stream)?;
        let (group, consumer) = (group.to_owned(), consumer.to_owned());
        self.inner
            .request(|reply| Op::Leave {
                stream: si,
                group,
                consumer,
                reply,
            })
            .await
    }

    async fn stream_stats(&self, stream: &str) -> Result<Vec<PartitionStats>, EngineError> {
        let si = self.inner.stream_idx(stream)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<PartitionStats>, EngineError> {
            let s = &inner.shared.streams[si];
            // Read the committed marks before the snapshot, so it has them.
            let nexts: Vec<u64> = s
                .partitions
                .iter()
                .map(|p| p.next.load(Ordering::SeqCst))
                .collect();
            let db = inner.db()?;
            let read = db.begin_read().map_err(|e| store_err(e.into()))?;
            let srec = read.open_table(SREC).map_err(|e| store_err(e.into()))?;
            let mut out = Vec::new();
            for (p, &next) in nexts.iter().enumerate() {
                let p = p as u32;
                let first = srec
                    .range((s.id, p, 0)..(s.id, p, next))
                    .map_err(|e| store_err(e.into()))?
                    .next()
                    .transpose()
                    .map_err(|e| store_err(e.into()))?
                    .map_or(next, |(k, _)| k.value().2);
                out.push(PartitionStats {
                    partition: p,
                    records: next - first,
                    next_sequence: next,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|_| EngineError::Closed)?
    }

    async fn ready(&self) -> Result<(), EngineError> {
        self.inner.sender()?;
        if self.inner.shared.failed.load(Ordering::SeqCst) {
            return Err(EngineError::Storage(StoreError::Failed));
        }
        Ok(())
    }

    async fn close(&self) {
        if let Ok(mut t) = self.inner.ticker.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
        if let Ok(mut tx) = self.inner.tx.write() {
            tx.take();
        }
        if let Ok(mut db) = self.inner.db.write() {
            db.take();
        }
        if let Some(done) = self.inner.writer_done.lock().await.take() {
            let _ = done.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EngineConfig};
    use redb::ReadableTable;

    const DAY_MS: u64 = 24 * 3600 * 1000;

    /// Opens an engine on `dir` with the given queues. The housekeeping
    /// ticker's first sweep is five seconds away; the tests drive the
    /// writer themselves, with the times they need.
    async fn open(dir: &std::path::Path, queues: &[(&str, QueueConfig)]) -> EmbeddedEngine {
        let mut config = Config {
            engine: EngineConfig::Embedded(EmbeddedConfig {
                dir: dir.join("data"),
                ..EmbeddedConfig::default()
            }),
            ..Config::default()
        };
        for (name, q) in queues {
            config.queues.insert((*name).into(), q.clone());
        }
        let topology = config.validate().expect("valid config");
        let EngineConfig::Embedded(e) = &config.engine else {
            unreachable!()
        };
        EmbeddedEngine::open(&topology, e).await.expect("open")
    }

    fn event(id: &str) -> CloudEvent {
        CloudEvent::new(id, "/t", "t", &[], &serde_json::json!({})).expect("event")
    }

    /// Runs the retention sweep as the ticker would at `now`.
    async fn sweep(e: &EmbeddedEngine, now: u64) {
        while e
            .inner
            .request(|reply| Op::Sweep { now, reply })
            .await
            .expect("sweep")
        {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redrive_restarts_retention() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = open(
            dir.path(),
            &[
                (
                    "src",
                    QueueConfig {
                        retention: Duration::from_millis(4 * DAY_MS),
                        dead_letter: Some("dlq".into()),
                        ..QueueConfig::default()
                    },
                ),
                (
                    "dlq",
                    QueueConfig {
                        retention: Duration::from_millis(14 * DAY_MS),
                        ..QueueConfig::default()
                    },
                ),
            ],
        )
        .await;
        // Enqueued five days ago: dead-lettered (the DLQ keeps 14 days)
        // and redriven today.
        let src = e.inner.queue_idx("src").unwrap();
        let item = e
            .inner
            .queue_append(src, &event("m"), None, now_ms() - 5 * DAY_MS)
            .unwrap();
        e.inner.append(vec![item], 1).await.unwrap();
        let got = e.receive("src", ReceiveRequest::default()).await.unwrap();
        assert_eq!(got.len(), 1);
        e.dead_letter("src", &got[0].receipt).await.unwrap();
        let before = now_ms();
        assert_eq!(e.redrive("dlq", 10).await.unwrap(), 1);
        let redriven_at = now_ms();

        // The source queue's next sweep must not take it: it was enqueued
        // there again today.
        sweep(&e, redriven_at + 1_000).await;
        let got = e.receive("src", ReceiveRequest::default()).await.unwrap();
        assert_eq!(got.len(), 1, "the redriven message was swept");
        assert!(got[0].sent_at_ms >= before, "sent_at_ms is the redrive's");
        // Its retention still applies, from the redrive on.
        e.change_visibility("src", &got[0].receipt, Duration::ZERO)
            .await
            .unwrap();
        sweep(&e, redriven_at + 4 * DAY_MS + 1_000).await;
        assert!(
            e.receive("src", ReceiveRequest::default())
                .await
                .unwrap()
                .is_empty()
        );
        e.close().await;
    }

    /// Acks and extensions leave the old deadline in the visibility heap;
    /// behind one long-held message (the earliest deadline, so the top)
    /// they were never popped and grew without bound: at 12 h visibility
    /// and 1k msg/s, tens of millions of entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn visibility_heap_stays_bounded_behind_a_held_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = open(
            dir.path(),
            &[(
                "q",
                QueueConfig {
                    visibility_timeout: Duration::from_secs(12 * 3600),
                    ..QueueConfig::default()
                },
            )],
        )
        .await;
        let qi = e.inner.queue_idx("q").unwrap();
        let heap_len = || e.inner.shared.queues[qi].state.lock().unwrap().heap.len();
        e.send("q", vec![event("held").into()]).await.unwrap();
        let held = e.receive("q", ReceiveRequest::default()).await.unwrap();
        assert_eq!(held.len(), 1);
        let batch = ReceiveRequest {
            max_messages: 10,
            ..ReceiveRequest::default()
        };
        let mut most = 0;
        for round in 0..400 {
            let msgs = (0..10)
                .map(|i| event(&format!("m{round}-{i}")).into())
                .collect();
            e.send("q", msgs).await.unwrap();
            let got = e.receive("q", batch.clone()).await.unwrap();
            assert_eq!(got.len(), 10);
            // An extension leaves a stale entry too.
            e.change_visibility("q", &got[0].receipt, Duration::from_secs(12 * 3600))
                .await
                .unwrap();
            let receipts: Vec<Receipt> = got.iter().map(|d| d.receipt.clone()).collect();
            assert!(
                e.ack("q", &receipts)
                    .await
                    .unwrap()
                    .iter()
                    .all(Result::is_ok)
            );
            most = most.max(heap_len());
        }
        // 4400 pushes, with at most 11 messages in flight.
        assert!(
            most <= 2 * 11 + HEAP_SLACK,
            "the heap grew to {most} entries with at most 11 messages in flight"
        );
        e.close().await;
    }

    /// After a restart, a FIFO message read from disk while its group is
    /// busy is set aside; its stored receive count must come along, or
    /// `max_receives` starts over and its receive-count row is orphaned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifo_message_set_aside_after_restart_keeps_its_receive_count() {
        let dir = tempfile::tempdir().expect("temp dir");
        let queues = [(
            "f",
            QueueConfig {
                fifo: true,
                max_receives: Some(5),
                ..QueueConfig::default()
            },
        )];
        let e = open(dir.path(), &queues).await;
        let g = |id: &str| {
            CloudEvent::new(
                id,
                "/t",
                "t",
                &[("partitionkey", "A")],
                &serde_json::json!({}),
            )
            .unwrap()
            .into()
        };
        e.send("f", vec![g("a1"), g("a2")]).await.unwrap();
        let all = ReceiveRequest {
            max_messages: 10,
            ..ReceiveRequest::default()
        };
        // Both delivered twice: their counts (2) are stored.
        for n in 1..=2 {
            let got = e.receive("f", all.clone()).await.unwrap();
            assert_eq!(got.len(), 2);
            assert!(got.iter().all(|d| d.receive_count == n));
            for d in &got {
                e.change_visibility("f", &d.receipt, Duration::ZERO)
                    .await
                    .unwrap();
            }
        }
        e.close().await;

        let e = open(dir.path(), &queues).await;
        // One per group: a1 goes out, a2 is read and set aside.
        let head = ReceiveRequest {
            one_per_group: true,
            ..all.clone()
        };
        let got = e.receive("f", head.clone()).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, 3);
        e.ack("f", &[got[0].receipt.clone()]).await.unwrap();
        let got = e.receive("f", head).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, 3, "a2's stored count was lost");
        e.ack("f", &[got[0].receipt.clone()]).await.unwrap();

        // No receive-count row is left behind.
        let db = e.inner.db().unwrap();
        let read = db.begin_read().unwrap();
        let rows = read.open_table(QRECV).unwrap().iter().unwrap().count();
        assert_eq!(rows, 0, "orphaned receive-count rows");
        drop(read);
        drop(db);
        e.close().await;
    }

    /// Collects the messages of ERROR events (a minimal subscriber: the
    /// crate has no tracing-subscriber).
    struct Errors(Arc<Mutex<Vec<String>>>);

    impl tracing::Subscriber for Errors {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Text(String);
            impl tracing::field::Visit for Text {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!("{}={v:?} ", f.name()));
                }
            }
            if *event.metadata().level() == tracing::Level::ERROR {
                let mut t = Text(String::new());
                event.record(&mut t);
                self.0.lock().unwrap().push(t.0);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// With `Durability::Interval` a publish is acknowledged before it is on
    /// disk; a full disk shows up only at the ticker's durable commit, and
    /// that failure must be logged as the loss it is, not discarded.
    #[tokio::test(flavor = "current_thread")]
    async fn interval_flush_failure_is_logged() {
        let errors = Arc::new(Mutex::new(Vec::new()));
        // Thread-local; the ticker runs on this (current-thread) runtime.
        let _guard = tracing::subscriber::set_default(Errors(errors.clone()));
        let dir = tempfile::tempdir().expect("temp dir");
        let fault = FaultInjection::new();
        let mut config = Config {
            engine: EngineConfig::Embedded(EmbeddedConfig {
                dir: dir.path().join("data"),
                durability: Durability::Interval(Duration::from_millis(20)),
                fault_injection: Some(fault.clone()),
                ..EmbeddedConfig::default()
            }),
            ..Config::default()
        };
        config.queues.insert("q".into(), QueueConfig::default());
        let topology = config.validate().expect("valid config");
        let EngineConfig::Embedded(c) = &config.engine else {
            unreachable!()
        };
        let e = EmbeddedEngine::open(&topology, c).await.expect("open");
        fault.fail_writes(true);
        // Acknowledged, though the disk is full: the commit is in memory.
        let sent = e.send("q", vec![event("acked").into()]).await;
        assert!(sent.is_ok(), "{sent:?}");
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let logged = errors
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.contains("periodic durable commit failed") && m.contains("LOST"));
            if logged {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "no error logged for the failed flush: {:?}",
                errors.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(e.inner.shared.failed.load(Ordering::SeqCst));
        e.close().await;
    }

    /// Redrive of a FIFO dead-letter queue also takes the part of a busy
    /// group's backlog that was left on disk (over `HELD_PER_GROUP`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redrive_takes_a_fifo_backlog_left_on_disk() {
        const N: usize = HELD_PER_GROUP + 50;
        let dir = tempfile::tempdir().expect("temp dir");
        let e = open(
            dir.path(),
            &[
                (
                    "src",
                    QueueConfig {
                        fifo: true,
                        dead_letter: Some("dlq".into()),
                        ..QueueConfig::default()
                    },
                ),
                (
                    "dlq",
                    QueueConfig {
                        fifo: true,
                        ..QueueConfig::default()
                    },
                ),
            ],
        )
        .await;
        let msgs: Vec<OutgoingMessage> = (0..=N).map(|i| event(&format!("m{i}")).into()).collect();
        e.send("src", msgs).await.unwrap();
        let mut moved = 0;
        while moved <= N {
            let got = e
                .receive(
                    "src",
                    ReceiveRequest {
                        max_messages: 10,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert!(!got.is_empty());
            for d in got {
                e.dead_letter("src", &d.receipt).await.unwrap();
                moved += 1;
            }
        }
        // All of one group (no `partitionkey`): hold its head, then a
        // receive passes the cursor over the rest.
        let head = e.receive("dlq", ReceiveRequest::default()).await.unwrap();
        assert_eq!(head.len(), 1);
        assert!(
            e.receive("dlq", ReceiveRequest::default())
                .await
                .unwrap()
                .is_empty()
        );
        {
            let q = &e.inner.shared.queues[e.inner.queue_idx("dlq").unwrap()];
            let st = q.state.lock().unwrap();
            assert_eq!(st.skipped.len(), HELD_PER_GROUP);
            assert_eq!(st.overflow.len(), 1, "the rest is left on disk");
        }
        assert_eq!(e.redrive("dlq", 10_000).await.unwrap(), N as u64);
        let q = &e.inner.shared.queues[e.inner.queue_idx("dlq").unwrap()];
        assert!(q.state.lock().unwrap().overflow.is_empty());
        assert_eq!(e.queue_stats("src").await.unwrap().ready, N as u64);
        e.close().await;
    }
}
