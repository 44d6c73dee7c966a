//! redb tables, record encodings, and the single writer thread.
//!
//! Every mutation goes through one thread that drains whatever operations
//! are queued, applies them all in one write transaction and commits once:
//! that is the group commit. A transaction is committed with
//! `Durability::Immediate` (one fsync) only when it contains a publish and
//! the durability mode is `always`; acks, receive counts, moves and lease
//! changes ride along non-durably and become durable with the next fsync
//! (losing them in a crash only causes redelivery, which at-least-once
//! allows). Memory effects (the committed high-water marks receivers read
//! up to, counters, wake-ups) are applied only after a commit succeeded, so
//! nothing is ever visible or acknowledged that was not stored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use redb::backends::FileBackend;
use redb::{
    Builder, Database, Durability as RedbDurability, ReadableDatabase, ReadableTable,
    StorageBackend, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use super::{Shared, TailMsg};
use crate::config::DEDUP_WINDOW;
use crate::engine::Lease;
use crate::engine::leases::{self, LeaseState};

/// Entity name (`q:<name>` or `s:<name>`) → numeric id used in keys.
pub(super) const ENTITIES: TableDefinition<&str, u32> = TableDefinition::new("entities");
/// (queue, seq) → message record. Everything a queue holds that is due.
pub(super) const QMSG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("queue_messages");
/// (queue, seq) → receive count, written only once a message is delivered a
/// second time (the first delivery costs no write).
pub(super) const QRECV: TableDefinition<(u32, u64), u32> = TableDefinition::new("queue_receives");
/// (queue, due ms, delayed seq) → message record not yet due.
pub(super) const QDELAY: TableDefinition<(u32, u64, u64), &[u8]> =
    TableDefinition::new("queue_delayed");
/// (queue, dedup key) → (expiry ms, message id) for FIFO deduplication.
pub(super) const QDEDUP: TableDefinition<(u32, &str), (u64, &str)> =
    TableDefinition::new("queue_dedup");
/// (queue, expiry ms, dedup key): the same entries in expiry order.
pub(super) const QDEDUP_EXP: TableDefinition<(u32, u64, &str), ()> =
    TableDefinition::new("queue_dedup_expiry");
/// queue → (messages, delayed, next seq, next delayed seq, dead-lettered).
pub(super) const QCOUNT: TableDefinition<u32, (u64, u64, u64, u64, u64)> =
    TableDefinition::new("queue_counters");
/// (stream, partition, seq) → stream record.
pub(super) const SREC: TableDefinition<(u32, u32, u64), &[u8]> =
    TableDefinition::new("stream_records");
/// (stream, group, partition) → lease record.
pub(super) const SLEASE: TableDefinition<(u32, &str, u32), &[u8]> =
    TableDefinition::new("stream_leases");
/// (stream, group, consumer) → membership expiry ms.
pub(super) const SMEMBER: TableDefinition<(u32, &str, &str), u64> =
    TableDefinition::new("stream_members");

/// Most operations folded into one transaction. Bounds the latency one
/// commit adds to the first operation in it; 512 one-event publishes or a
/// few 1000-event batches still share one fsync.
const MAX_OPS_PER_COMMIT: usize = 512;
/// Most rows one sweep or promotion deletes/moves, so housekeeping never
/// holds the writer for long; the ticker comes back for the rest.
const HOUSEKEEPING_BATCH: usize = 5_000;

const NO_ORIGIN: u32 = u32::MAX;

/// Why the embedded store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the broker data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("cannot open the broker database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<redb::Error>,
    },
    #[error("database operation failed")]
    Redb(#[source] Arc<redb::Error>),
    #[error(
        "an earlier write to the broker database failed; writes are refused until the broker restarts"
    )]
    Failed,
    #[error("the broker's writer thread has stopped")]
    WriterGone,
    #[error("a stored record is corrupt ({0})")]
    Corrupt(&'static str),
}

impl StoreError {
    /// Whether the underlying cause is a full disk.
    pub fn is_full(&self) -> bool {
        let Self::Redb(e) = self else { return false };
        match &**e {
            redb::Error::Io(io) => io.kind() == io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    fn is_io(&self) -> bool {
        match self {
            Self::Redb(e) => matches!(
                &**e,
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::Corrupted(_)
            ),
            _ => false,
        }
    }
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        Self::Redb(Arc::new(e.into()))
    }
}

/// A test hook on the embedded engine's storage: makes writes fail as if
/// the disk were full, and counts fsyncs.
#[derive(Debug, Clone, Default)]
pub struct FaultInjection {
    state: Arc<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    fail_writes: AtomicBool,
    syncs: AtomicU64,
}

impl FaultInjection {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, every write and fsync fails with "no space left".
    pub fn fail_writes(&self, on: bool) {
        self.state.fail_writes.store(on, Ordering::SeqCst);
    }

    /// fsyncs issued so far.
    pub fn syncs(&self) -> u64 {
        self.state.syncs.load(Ordering::SeqCst)
    }

    fn check(&self) -> io::Result<()> {
        if self.state.fail_writes.load(Ordering::SeqCst) {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        } else {
            Ok(())
        }
    }
}

#[derive(Debug)]
struct FaultBackend {
    file: FileBackend,
    fault: FaultInjection,
}

impl StorageBackend for FaultBackend {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fault.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.fault.check()?;
        self.fault.state.syncs.fetch_add(1, Ordering::SeqCst);
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.fault.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }
    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.query_lock_range(start, end)
    }
}

/// Opens (creating if needed) `dir/broker.redb`.
pub(super) fn open_database(
    dir: &Path,
    cache_bytes: usize,
    fault: Option<&FaultInjection>,
) -> Result<Database, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::CreateDir {
        path: dir.to_owned(),
        source: Arc::new(e),
    })?;
    let path = dir.join("broker.redb");
    let open_err = |e: redb::Error| StoreError::Open {
        path: path.clone(),
        source: Arc::new(e),
    };
    let mut builder = Builder::new();
    builder.set_cache_size(cache_bytes);
    let db = match fault {
        None => builder.create(&path).map_err(|e| open_err(e.into()))?,
        Some(fault) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| open_err(e.into()))?;
            let file = FileBackend::new(file).map_err(|e| open_err(e.into()))?;
            builder
                .create_with_backend(FaultBackend {
                    file,
                    fault: fault.clone(),
                })
                .map_err(|e| open_err(e.into()))?
        }
    };
    Ok(db)
}

// ---------------------------------------------------------------------------
// Record encodings

/// A queue message as stored: header then the CloudEvent's bytes.
pub(super) struct MsgRecord<'a> {
    pub enqueued_ms: u64,
    /// The queue a dead-lettered message came from (for redrive).
    pub origin: u32,
    pub group: &'a str,
    pub event: &'a [u8],
}

impl<'a> MsgRecord<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(15 + self.group.len() + self.event.len());
        v.push(1);
        v.extend_from_slice(&self.enqueued_ms.to_le_bytes());
        v.extend_from_slice(&self.origin.to_le_bytes());
        v.extend_from_slice(&(self.group.len() as u16).to_le_bytes());
        v.extend_from_slice(self.group.as_bytes());
        v.extend_from_slice(self.event);
        v
    }

    pub fn decode(b: &'a [u8]) -> Result<Self, StoreError> {
        let bad = StoreError::Corrupt("queue message");
        if b.len() < 15 || b[0] != 1 {
            return Err(bad);
        }
        let enqueued_ms = u64::from_le_bytes(b[1..9].try_into().map_err(|_| bad.clone())?);
        let origin = u32::from_le_bytes(b[9..13].try_into().map_err(|_| bad.clone())?);
        let glen = u16::from_le_bytes(b[13..15].try_into().map_err(|_| bad.clone())?) as usize;
        let group = b
            .get(15..15 + glen)
            .and_then(|g| std::str::from_utf8(g).ok())
            .ok_or(bad.clone())?;
        let event = b.get(15 + glen..).ok_or(bad)?;
        Ok(Self {
            enqueued_ms,
            origin,
            group,
            event,
        })
    }
}

/// A stream record as stored: timestamp, partition key, event bytes.
pub(super) struct StreamRecord<'a> {
    pub ts_ms: u64,
    pub key: &'a str,
    pub event: &'a [u8],
}

impl<'a> StreamRecord<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(10 + self.key.len() + self.event.len());
        v.extend_from_slice(&self.ts_ms.to_le_bytes());
        v.extend_from_slice(&(self.key.len() as u16).to_le_bytes());
        v.extend_from_slice(self.key.as_bytes());
        v.extend_from_slice(self.event);
        v
    }

    pub fn decode(b: &'a [u8]) -> Result<Self, StoreError> {
        let bad = StoreError::Corrupt("stream record");
        if b.len() < 10 {
            return Err(bad);
        }
        let ts_ms = u64::from_le_bytes(b[0..8].try_into().map_err(|_| bad.clone())?);
        let klen = u16::from_le_bytes(b[8..10].try_into().map_err(|_| bad.clone())?) as usize;
        let key = b
            .get(10..10 + klen)
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or(bad.clone())?;
        let event = b.get(10 + klen..).ok_or(bad)?;
        Ok(Self { ts_ms, key, event })
    }
}

fn encode_lease(l: &LeaseState) -> Vec<u8> {
    let mut v = Vec::with_capacity(26 + l.owner.len());
    v.extend_from_slice(&(l.owner.len() as u16).to_le_bytes());
    v.extend_from_slice(l.owner.as_bytes());
    v.extend_from_slice(&l.token.to_le_bytes());
    v.extend_from_slice(&l.expires_ms.to_le_bytes());
    v.extend_from_slice(&l.checkpoint.to_le_bytes());
    v
}

fn decode_lease(b: &[u8]) -> Result<LeaseState, StoreError> {
    let bad = || StoreError::Corrupt("stream lease");
    let olen =
        u16::from_le_bytes(b.get(0..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let owner = std::str::from_utf8(b.get(2..2 + olen).ok_or_else(bad)?)
        .map_err(|_| bad())?
        .to_owned();
    let n = |at: usize| -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(
            b.get(at..at + 8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ))
    };
    Ok(LeaseState {
        owner,
        token: n(2 + olen)?,
        expires_ms: n(10 + olen)?,
        checkpoint: n(18 + olen)?,
    })
}

// ---------------------------------------------------------------------------
// Writer

/// One thing for the writer to do. Queues and streams are referred to by
/// their index in [`Shared`].
pub(super) enum Op {
    Append {
        items: Vec<Append>,
        durable: bool,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    /// Acknowledged messages: (seq, whether a receive count row exists).
    Delete {
        queue: usize,
        seqs: Vec<(u64, bool)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Receive counts of redelivered messages, so they survive a restart.
    RecordReceives {
        queue: usize,
        counts: Vec<(u64, u32)>,
    },
    /// Moves messages to another queue (`to`), back to where they came from
    /// (`Redrive`), or drops them (`Drop`).
    Move {
        queue: usize,
        seqs: Vec<u64>,
        to: MoveTo,
        reply: Option<oneshot::Sender<Result<u64, StoreError>>>,
    },
    /// Moves delayed messages that are due into their queues.
    Promote {
        now: u64,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Retention and deduplication expiry.
    Sweep {
        now: u64,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Acquire {
        stream: usize,
        group: String,
        consumer: String,
        ttl_ms: u64,
        now: u64,
        reply: oneshot::Sender<Result<Vec<Lease>, StoreError>>,
    },
    Checkpoint {
        stream: usize,
        group: String,
        consumer: String,
        partition: u32,
        token: u64,
        sequence: u64,
        now: u64,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Leave {
        stream: usize,
        group: String,
        consumer: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Makes everything committed so far durable.
    Flush {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum MoveTo {
    Queue(usize),
    /// Back to the origin queue, enqueued afresh at `now` (ms).
    Redrive {
        now: u64,
    },
    Drop,
}

/// One event to store in one queue or stream.
pub(super) enum Append {
    Queue {
        queue: usize,
        event: bytes::Bytes,
        group: String,
        dedup: Option<String>,
        delay_ms: u64,
        now: u64,
    },
    Stream {
        stream: usize,
        partition: u32,
        key: String,
        event: bytes::Bytes,
        now: u64,
    },
}

/// Where an [`Append`] was stored.
#[derive(Debug, Clone)]
pub(super) enum Appended {
    Queue { id: String, duplicate: bool },
    Stream { partition: u32, sequence: u64 },
}

/// Counters the writer owns (it alone assigns sequence numbers).
#[derive(Debug, Clone)]
pub(super) struct WriterQueue {
    pub id: u32,
    pub msgs: u64,
    pub delayed: u64,
    pub next_seq: u64,
    pub next_dseq: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone)]
pub(super) struct WriterStream {
    pub id: u32,
    /// Per partition: (next sequence, last timestamp).
    pub parts: Vec<(u64, u64)>,
}

#[derive(Debug, Clone)]
pub(super) struct WriterState {
    pub queues: Vec<WriterQueue>,
    pub streams: Vec<WriterStream>,
}

/// What a commit changed that memory must learn about.
#[derive(Default)]
struct Effects {
    /// queue → highest seq appended.
    appended: HashMap<usize, u64>,
    /// queue → the appended messages, in seq order, for the in-memory tail.
    tail: HashMap<usize, Vec<TailMsg>>,
    /// queue → seqs removed behind receivers' backs (retention).
    expired: HashMap<usize, Vec<u64>>,
    /// earliest due time of newly delayed messages.
    next_due: Option<u64>,
    /// (stream, partition) → next sequence.
    stream_next: HashMap<(usize, u32), u64>,
    touched: BTreeSet<usize>,
}

impl Effects {
    fn append(&mut self, queue: usize, msg: TailMsg) {
        self.appended.insert(queue, msg.seq);
        self.tail.entry(queue).or_default().push(msg);
    }

    /// Records an append whose bytes came from disk (moves, promotions).
    fn append_record(&mut self, queue: usize, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        let rec = MsgRecord::decode(record)?;
        self.append(
            queue,
            TailMsg {
                seq,
                group: Arc::from(rec.group),
                enqueued_ms: rec.enqueued_ms,
                event: bytes::Bytes::copy_from_slice(rec.event),
            },
        );
        Ok(())
    }
}

/// The tables of one write transaction, opened on first use: opening all
/// of them costs more than a small commit itself. (The types are the table
/// schemas above, spelled out.)
#[allow(clippy::type_complexity)]
struct Tables<'t> {
    txn: &'t WriteTransaction,
    qmsg: Option<Table<'t, (u32, u64), &'static [u8]>>,
    qrecv: Option<Table<'t, (u32, u64), u32>>,
    qdelay: Option<Table<'t, (u32, u64, u64), &'static [u8]>>,
    qdedup: Option<Table<'t, (u32, &'static str), (u64, &'static str)>>,
    qdedup_exp: Option<Table<'t, (u32, u64, &'static str), ()>>,
    qcount: Option<Table<'t, u32, (u64, u64, u64, u64, u64)>>,
    srec: Option<Table<'t, (u32, u32, u64), &'static [u8]>>,
    slease: Option<Table<'t, (u32, &'static str, u32), &'static [u8]>>,
    smember: Option<Table<'t, (u32, &'static str, &'static str), u64>>,
}

#[allow(clippy::type_complexity)]
impl<'t> Tables<'t> {
    fn new(txn: &'t WriteTransaction) -> Self {
        Self {
            txn,
            qmsg: None,
            qrecv: None,
            qdelay: None,
            qdedup: None,
            qdedup_exp: None,
            qcount: None,
            srec: None,
            slease: None,
            smember: None,
        }
    }

    /// Creates every table (used once, at open).
    fn create_all(txn: &'t WriteTransaction) -> Result<(), StoreError> {
        let mut t = Self::new(txn);
        t.qmsg()?;
        t.qrecv()?;
        t.qdelay()?;
        t.qdedup()?;
        t.qdedup_exp()?;
        t.qcount()?;
        t.srec()?;
        t.slease()?;
        t.smember()?;
        Ok(())
    }

    fn qmsg(&mut self) -> Result<&mut Table<'t, (u32, u64), &'static [u8]>, StoreError> {
        if self.qmsg.is_none() {
            self.qmsg = Some(self.txn.open_table(QMSG)?);
        }
        self.qmsg.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn qrecv(&mut self) -> Result<&mut Table<'t, (u32, u64), u32>, StoreError> {
        if self.qrecv.is_none() {
            self.qrecv = Some(self.txn.open_table(QRECV)?);
        }
        self.qrecv.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn qdelay(&mut self) -> Result<&mut Table<'t, (u32, u64, u64), &'static [u8]>, StoreError> {
        if self.qdelay.is_none() {
            self.qdelay = Some(self.txn.open_table(QDELAY)?);
        }
        self.qdelay.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn qdedup(
        &mut self,
    ) -> Result<&mut Table<'t, (u32, &'static str), (u64, &'static str)>, StoreError> {
        if self.qdedup.is_none() {
            self.qdedup = Some(self.txn.open_table(QDEDUP)?);
        }
        self.qdedup.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn qdedup_exp(&mut self) -> Result<&mut Table<'t, (u32, u64, &'static str), ()>, StoreError> {
        if self.qdedup_exp.is_none() {
            self.qdedup_exp = Some(self.txn.open_table(QDEDUP_EXP)?);
        }
        self.qdedup_exp.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn qcount(&mut self) -> Result<&mut Table<'t, u32, (u64, u64, u64, u64, u64)>, StoreError> {
        if self.qcount.is_none() {
            self.qcount = Some(self.txn.open_table(QCOUNT)?);
        }
        self.qcount.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn srec(&mut self) -> Result<&mut Table<'t, (u32, u32, u64), &'static [u8]>, StoreError> {
        if self.srec.is_none() {
            self.srec = Some(self.txn.open_table(SREC)?);
        }
        self.srec.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn slease(
        &mut self,
    ) -> Result<&mut Table<'t, (u32, &'static str, u32), &'static [u8]>, StoreError> {
        if self.slease.is_none() {
            self.slease = Some(self.txn.open_table(SLEASE)?);
        }
        self.slease.as_mut().ok_or(StoreError::Corrupt("table"))
    }

    fn smember(
        &mut self,
    ) -> Result<&mut Table<'t, (u32, &'static str, &'static str), u64>, StoreError> {
        if self.smember.is_none() {
            self.smember = Some(self.txn.open_table(SMEMBER)?);
        }
        self.smember.as_mut().ok_or(StoreError::Corrupt("table"))
    }
}

/// Creates every table and assigns ids to the declared entities, then loads
/// the writer's counters.
pub(super) fn prepare(
    db: &Database,
    queues: &[String],
    streams: &[(String, u32)],
) -> Result<(Vec<u32>, Vec<u32>, WriterState), StoreError> {
    let txn = db.begin_write()?;
    let mut queue_ids = Vec::new();
    let mut stream_ids = Vec::new();
    {
        let mut entities = txn.open_table(ENTITIES)?;
        Tables::create_all(&txn)?;
        let mut next = entities
            .iter()?
            .filter_map(|r| r.ok().map(|(_, v)| v.value()))
            .max()
            .map_or(0, |m| m + 1);
        let mut id_for = |key: String| -> Result<u32, StoreError> {
            if let Some(v) = entities.get(key.as_str())? {
                return Ok(v.value());
            }
            let id = next;
            next += 1;
            entities.insert(key.as_str(), id)?;
            Ok(id)
        };
        for q in queues {
            queue_ids.push(id_for(format!("q:{q}"))?);
        }
        for (s, _) in streams {
            stream_ids.push(id_for(format!("s:{s}"))?);
        }
    }
    txn.commit()?;

    let read = db.begin_read()?;
    let qcount = read.open_table(QCOUNT)?;
    let qmsg = read.open_table(QMSG)?;
    let srec = read.open_table(SREC)?;
    let mut state = WriterState {
        queues: Vec::new(),
        streams: Vec::new(),
    };
    for &id in &queue_ids {
        let (msgs, delayed, next_seq, next_dseq, dead_lettered) = qcount
            .get(id)?
            .map(|v| v.value())
            .unwrap_or((0, 0, 1, 1, 0));
        // The counter row and the messages are written in the same
        // transaction, but take the larger anyway: a seq must never repeat.
        let last = qmsg
            .range((id, 0)..=(id, u64::MAX))?
            .next_back()
            .transpose()?
            .map_or(0, |(k, _)| k.value().1);
        state.queues.push(WriterQueue {
            id,
            msgs,
            delayed,
            next_seq: next_seq.max(last + 1),
            next_dseq,
            dead_lettered,
        });
    }
    for (i, &id) in stream_ids.iter().enumerate() {
        let partitions = streams[i].1;
        let mut parts = Vec::new();
        for p in 0..partitions {
            let last = srec
                .range((id, p, 0)..=(id, p, u64::MAX))?
                .next_back()
                .transpose()?;
            parts.push(match last {
                Some((k, v)) => (k.value().2 + 1, StreamRecord::decode(v.value())?.ts_ms),
                None => (1, 0),
            });
        }
        state.streams.push(WriterStream { id, parts });
    }
    Ok((queue_ids, stream_ids, state))
}

/// Starts the writer thread. It stops when every sender is dropped, after a
/// final durable commit; `done` fires when the database is closed.
pub(super) fn spawn_writer(
    db: Arc<Database>,
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    state: WriterState,
    always: bool,
    done: oneshot::Sender<()>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("broker-writer".into())
        .spawn(move || {
            Writer {
                db,
                shared,
                state,
                always,
            }
            .run(rx);
            let _ = done.send(());
        })
        .map(|_| ())
}

struct Writer {
    db: Arc<Database>,
    shared: Arc<Shared>,
    state: WriterState,
    always: bool,
}

impl Op {
    fn fail(self, e: StoreError) {
        match self {
            Op::Append { reply, .. } => drop(reply.send(Err(e))),
            Op::Delete { reply, .. } | Op::Leave { reply, .. } | Op::Flush { reply } => {
                drop(reply.send(Err(e)))
            }
            Op::Move { reply, .. } => {
                if let Some(r) = reply {
                    drop(r.send(Err(e)));
                }
            }
            Op::Promote { reply, .. } | Op::Sweep { reply, .. } => drop(reply.send(Err(e))),
            Op::Checkpoint { reply, .. } => drop(reply.send(Err(e))),
            Op::Acquire { reply, .. } => drop(reply.send(Err(e))),
            Op::RecordReceives { .. } => {}
        }
    }
}

/// What one op produced, to be sent once the commit succeeded.
enum Reply {
    Append(
        oneshot::Sender<Result<Vec<Appended>, StoreError>>,
        Vec<Appended>,
    ),
    Unit(oneshot::Sender<Result<(), StoreError>>),
    Count(Option<oneshot::Sender<Result<u64, StoreError>>>, u64),
    More(oneshot::Sender<Result<bool, StoreError>>, bool),
    Leases(oneshot::Sender<Result<Vec<Lease>, StoreError>>, Vec<Lease>),
    None,
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Append(r, v) => drop(r.send(Ok(v))),
            Reply::Unit(r) => drop(r.send(Ok(()))),
            Reply::Count(r, n) => {
                if let Some(r) = r {
                    drop(r.send(Ok(n)));
                }
            }
            Reply::More(r, b) => drop(r.send(Ok(b))),
            Reply::Leases(r, l) => drop(r.send(Ok(l))),
            Reply::None => {}
        }
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut dirty = false;
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            while ops.len() < MAX_OPS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            if self.shared.failed.load(Ordering::SeqCst) {
                for op in ops {
                    op.fail(StoreError::Failed);
                }
                continue;
            }
            let durable = ops.iter().any(|op| match op {
                Op::Append { durable, .. } => *durable && self.always,
                Op::Flush { .. } => true,
                _ => false,
            });
            let saved = self.state.clone();
            let mut effects = Effects::default();
            let mut ops_iter = ops.into_iter();
            let mut replies = Vec::new();
            let result = self.commit(durable, &mut ops_iter, &mut replies, &mut effects);
            match result {
                Ok(()) => {
                    dirty = !durable;
                    self.apply_effects(effects);
                    for r in replies {
                        r.send();
                    }
                }
                Err((e, failed_op)) => {
                    self.state = saved;
                    if e.is_io() {
                        self.shared.failed.store(true, Ordering::SeqCst);
                        tracing::error!(error = %e, source = ?std::error::Error::source(&e), "broker storage failed; refusing writes until restart");
                    }
                    // The transaction rolled back: nothing in it happened.
                    for r in replies {
                        match r {
                            Reply::Append(s, _) => drop(s.send(Err(e.clone()))),
                            Reply::Unit(s) => drop(s.send(Err(e.clone()))),
                            Reply::Count(Some(s), _) => drop(s.send(Err(e.clone()))),
                            Reply::More(s, _) => drop(s.send(Err(e.clone()))),
                            Reply::Leases(s, _) => drop(s.send(Err(e.clone()))),
                            Reply::Count(None, _) | Reply::None => {}
                        }
                    }
                    if let Some(op) = failed_op {
                        op.fail(e.clone());
                    }
                    for op in ops_iter {
                        op.fail(e.clone());
                    }
                }
            }
        }
        if dirty && !self.shared.failed.load(Ordering::SeqCst) {
            let flush = || -> Result<(), StoreError> {
                let txn = self.db.begin_write()?;
                txn.commit()?;
                Ok(())
            };
            if let Err(e) = flush() {
                tracing::error!(error = %e, "final broker flush failed");
            }
        }
    }

    // The error hands the failed op back so its caller gets the error; it
    // is the cold path, once per failed commit, so its size does not matter.
    #[allow(clippy::result_large_err)]
    fn commit(
        &mut self,
        durable: bool,
        ops: &mut std::vec::IntoIter<Op>,
        replies: &mut Vec<Reply>,
        effects: &mut Effects,
    ) -> Result<(), (StoreError, Option<Op>)> {
        let mut txn = self.db.begin_write().map_err(|e| (e.into(), None))?;
        if !durable {
            txn.set_durability(RedbDurability::None)
                .map_err(|e| (e.into(), None))?;
        }
        {
            let mut t = Tables::new(&txn);
            for op in ops.by_ref() {
                match self.apply(&mut t, op, effects) {
                    Ok(r) => replies.push(r),
                    Err((e, op)) => return Err((e, Some(op))),
                }
            }
            for &q in &effects.touched {
                let w = &self.state.queues[q];
                let counts = (w.msgs, w.delayed, w.next_seq, w.next_dseq, w.dead_lettered);
                t.qcount()
                    .and_then(|table| Ok(table.insert(w.id, counts)?))
                    .map_err(|e| (e, None))?;
            }
        }
        txn.commit().map_err(|e| (e.into(), None))
    }

    #[allow(clippy::result_large_err)]
    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        op: Op,
        fx: &mut Effects,
    ) -> Result<Reply, (StoreError, Op)> {
        // Each arm borrows the op's data, then moves its reply out on success.
        match op {
            Op::Append {
                items,
                durable,
                reply,
            } => match self.append(t, &items, fx) {
                Ok(v) => Ok(Reply::Append(reply, v)),
                Err(e) => Err((
                    e,
                    Op::Append {
                        items,
                        durable,
                        reply,
                    },
                )),
            },
            Op::Delete { queue, seqs, reply } => match self.delete(t, queue, &seqs, fx) {
                Ok(()) => Ok(Reply::Unit(reply)),
                Err(e) => Err((e, Op::Delete { queue, seqs, reply })),
            },
            Op::RecordReceives { queue, counts } => {
                let id = self.state.queues[queue].id;
                let r = (|| -> Result<(), StoreError> {
                    for &(seq, n) in &counts {
                        // Only if the message still exists (it may be acked).
                        if t.qmsg()?.get((id, seq))?.is_some() {
                            t.qrecv()?.insert((id, seq), n)?;
                        }
                    }
                    Ok(())
                })();
                match r {
                    Ok(()) => Ok(Reply::None),
                    Err(e) => Err((e, Op::RecordReceives { queue, counts })),
                }
            }
            Op::Move {
                queue,
                seqs,
                to,
                reply,
            } => match self.move_messages(t, queue, &seqs, to, fx) {
                Ok(n) => Ok(Reply::Count(reply, n)),
                Err(e) => Err((
                    e,
                    Op::Move {
                        queue,
                        seqs,
                        to,
                        reply,
                    },
                )),
            },
            Op::Promote { now, reply } => match self.promote(t, now, fx) {
                Ok(more) => Ok(Reply::More(reply, more)),
                Err(e) => Err((e, Op::Promote { now, reply })),
            },
            Op::Sweep { now, reply } => match self.sweep(t, now, fx) {
                Ok(more) => Ok(Reply::More(reply, more)),
                Err(e) => Err((e, Op::Sweep { now, reply })),
            },
            Op::Acquire {
                stream,
                group,
                consumer,
                ttl_ms,
                now,
                reply,
            } => match self.acquire(t, stream, &group, &consumer, ttl_ms, now) {
                Ok(l) => Ok(Reply::Leases(reply, l)),
                Err(e) => Err((
                    e,
                    Op::Acquire {
                        stream,
                        group,
                        consumer,
                        ttl_ms,
                        now,
                        reply,
                    },
                )),
            },
            Op::Checkpoint {
                stream,
                group,
                consumer,
                partition,
                token,
                sequence,
                now,
                reply,
            } => {
                let r = self.checkpoint(
                    t, stream, &group, &consumer, partition, token, sequence, now,
                );
                match r {
                    Ok(ok) => Ok(Reply::More(reply, ok)),
                    Err(e) => Err((
                        e,
                        Op::Checkpoint {
                            stream,
                            group,
                            consumer,
                            partition,
                            token,
                            sequence,
                            now,
                            reply,
                        },
                    )),
                }
            }
            Op::Leave {
                stream,
                group,
                consumer,
                reply,
            } => match self.leave(t, stream, &group, &consumer) {
                Ok(()) => Ok(Reply::Unit(reply)),
                Err(e) => Err((
                    e,
                    Op::Leave {
                        stream,
                        group,
                        consumer,
                        reply,
                    },
                )),
            },
            Op::Flush { reply } => Ok(Reply::Unit(reply)),
        }
    }

    fn append(
        &mut self,
        t: &mut Tables<'_>,
        items: &[Append],
        fx: &mut Effects,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Append::Queue {
                    queue,
                    event,
                    group,
                    dedup,
                    delay_ms,
                    now,
                } => {
                    let w = &mut self.state.queues[*queue];
                    let id = if *delay_ms > 0 {
                        format!("d{}", w.next_dseq)
                    } else {
                        w.next_seq.to_string()
                    };
                    if let Some(key) = dedup {
                        let existing = t.qdedup()?.get((w.id, key.as_str()))?.map(|v| {
                            let (exp, id) = v.value();
                            (exp, id.to_owned())
                        });
                        if let Some((exp, original)) = existing {
                            if exp > *now {
                                out.push(Appended::Queue {
                                    id: original,
                                    duplicate: true,
                                });
                                continue;
                            }
                            t.qdedup_exp()?.remove((w.id, exp, key.as_str()))?;
                        }
                        let exp = now + DEDUP_WINDOW.as_millis() as u64;
                        t.qdedup()?
                            .insert((w.id, key.as_str()), (exp, id.as_str()))?;
                        t.qdedup_exp()?.insert((w.id, exp, key.as_str()), ())?;
                    }
                    let rec = MsgRecord {
                        enqueued_ms: *now,
                        origin: NO_ORIGIN,
                        group,
                        event,
                    }
                    .encode();
                    if *delay_ms > 0 {
                        let due = now + delay_ms;
                        t.qdelay()?
                            .insert((w.id, due, w.next_dseq), rec.as_slice())?;
                        w.next_dseq += 1;
                        w.delayed += 1;
                        fx.next_due = Some(fx.next_due.map_or(due, |d| d.min(due)));
                    } else {
                        t.qmsg()?.insert((w.id, w.next_seq), rec.as_slice())?;
                        fx.append(
                            *queue,
                            TailMsg {
                                seq: w.next_seq,
                                group: Arc::from(group.as_str()),
                                enqueued_ms: *now,
                                event: event.clone(),
                            },
                        );
                        w.next_seq += 1;
                        w.msgs += 1;
                    }
                    fx.touched.insert(*queue);
                    out.push(Appended::Queue {
                        id,
                        duplicate: false,
                    });
                }
                Append::Stream {
                    stream,
                    partition,
                    key,
                    event,
                    now,
                } => {
                    let w = &mut self.state.streams[*stream];
                    let (next, last_ts) = &mut w.parts[*partition as usize];
                    // Timestamps never go backwards within a partition, so
                    // at-timestamp iterators can binary-search by sequence.
                    let ts = (*now).max(*last_ts);
                    let rec = StreamRecord {
                        ts_ms: ts,
                        key,
                        event,
                    }
                    .encode();
                    t.srec()?
                        .insert((w.id, *partition, *next), rec.as_slice())?;
                    out.push(Appended::Stream {
                        partition: *partition,
                        sequence: *next,
                    });
                    *next += 1;
                    *last_ts = ts;
                    fx.stream_next.insert((*stream, *partition), *next);
                }
            }
        }
        Ok(out)
    }

    fn delete(
        &mut self,
        t: &mut Tables<'_>,
        queue: usize,
        seqs: &[(u64, bool)],
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let w = &mut self.state.queues[queue];
        for &(seq, recv) in seqs {
            if t.qmsg()?.remove((w.id, seq))?.is_some() {
                w.msgs = w.msgs.saturating_sub(1);
            }
            if recv {
                t.qrecv()?.remove((w.id, seq))?;
            }
        }
        fx.touched.insert(queue);
        Ok(())
    }

    fn move_messages(
        &mut self,
        t: &mut Tables<'_>,
        queue: usize,
        seqs: &[u64],
        to: MoveTo,
        fx: &mut Effects,
    ) -> Result<u64, StoreError> {
        let src_id = self.state.queues[queue].id;
        let mut moved = 0;
        for &seq in seqs {
            let Some(guard) = t.qmsg()?.remove((src_id, seq))? else {
                continue;
            };
            let bytes = guard.value().to_vec();
            drop(guard);
            t.qrecv()?.remove((src_id, seq))?;
            let src = &mut self.state.queues[queue];
            src.msgs = src.msgs.saturating_sub(1);
            fx.touched.insert(queue);
            let rec = MsgRecord::decode(&bytes)?;
            let (target, origin) = match to {
                MoveTo::Drop => {
                    src.dead_lettered += 1;
                    moved += 1;
                    continue;
                }
                MoveTo::Queue(dlq) => {
                    src.dead_lettered += 1;
                    (dlq, src_id)
                }
                MoveTo::Redrive { .. } => {
                    let Some(&origin) = self.shared.queue_by_id.get(&rec.origin) else {
                        // Its source queue is no longer declared: keep it.
                        let src = &mut self.state.queues[queue];
                        t.qmsg()?.insert((src_id, src.next_seq), bytes.as_slice())?;
                        fx.append_record(queue, src.next_seq, &bytes)?;
                        src.next_seq += 1;
                        src.msgs += 1;
                        continue;
                    };
                    (origin, NO_ORIGIN)
                }
            };
            let w = &mut self.state.queues[target];
            // A redriven message is a new message of its origin queue (as in
            // SQS; NATS republishes it): its retention starts again. Kept,
            // the original enqueue time would let the origin's (shorter)
            // retention delete it at the next sweep. A move to a dead-letter
            // queue keeps it, as SQS does for standard queues.
            let enqueued_ms = match to {
                MoveTo::Redrive { now } => now,
                _ => rec.enqueued_ms,
            };
            let encoded = MsgRecord {
                enqueued_ms,
                origin,
                ..rec
            }
            .encode();
            t.qmsg()?.insert((w.id, w.next_seq), encoded.as_slice())?;
            fx.append_record(target, w.next_seq, &encoded)?;
            w.next_seq += 1;
            w.msgs += 1;
            fx.touched.insert(target);
            moved += 1;
        }
        Ok(moved)
    }

    fn promote(
        &mut self,
        t: &mut Tables<'_>,
        now: u64,
        fx: &mut Effects,
    ) -> Result<bool, StoreError> {
        let mut budget = HOUSEKEEPING_BATCH;
        let mut next_due: Option<u64> = None;
        for (q, w) in self.state.queues.iter_mut().enumerate() {
            if w.delayed == 0 {
                continue;
            }
            let due: Vec<(u64, u64, Vec<u8>)> = {
                let mut v = Vec::new();
                for row in t
                    .qdelay()?
                    .range((w.id, 0, 0)..=(w.id, u64::MAX, u64::MAX))?
                {
                    let (k, val) = row?;
                    let (_, at, dseq) = k.value();
                    if at > now || v.len() >= budget {
                        next_due = Some(next_due.map_or(at, |d| d.min(at)));
                        break;
                    }
                    v.push((at, dseq, val.value().to_vec()));
                }
                v
            };
            budget -= due.len();
            for (at, dseq, rec) in due {
                t.qdelay()?.remove((w.id, at, dseq))?;
                t.qmsg()?.insert((w.id, w.next_seq), rec.as_slice())?;
                fx.append_record(q, w.next_seq, &rec)?;
                w.next_seq += 1;
                w.msgs += 1;
                w.delayed = w.delayed.saturating_sub(1);
                fx.touched.insert(q);
            }
            if budget == 0 {
                return Ok(true);
            }
        }
        self.shared
            .next_due
            .store(next_due.unwrap_or(u64::MAX), Ordering::SeqCst);
        Ok(false)
    }

    fn sweep(
        &mut self,
        t: &mut Tables<'_>,
        now: u64,
        fx: &mut Effects,
    ) -> Result<bool, StoreError> {
        let mut budget = HOUSEKEEPING_BATCH;
        for (q, w) in self.state.queues.iter_mut().enumerate() {
            let retention = self.shared.queues[q].config.retention.as_millis() as u64;
            let mut old = Vec::new();
            for row in t.qmsg()?.range((w.id, 0)..=(w.id, u64::MAX))? {
                let (k, v) = row?;
                if old.len() >= budget {
                    break;
                }
                let rec = MsgRecord::decode(v.value())?;
                // Seqs are assigned in time order (up to delays), so the
                // first young message ends the expired prefix.
                if rec.enqueued_ms.saturating_add(retention) > now {
                    break;
                }
                old.push(k.value().1);
            }
            budget -= old.len();
            for &seq in &old {
                t.qmsg()?.remove((w.id, seq))?;
                t.qrecv()?.remove((w.id, seq))?;
                w.msgs = w.msgs.saturating_sub(1);
            }
            if !old.is_empty() {
                fx.touched.insert(q);
                fx.expired.insert(q, old);
            }
            let stale: Vec<(u64, String)> = {
                let mut v = Vec::new();
                for row in t.qdedup_exp()?.range((w.id, 0, "")..(w.id, now, ""))? {
                    let (k, _) = row?;
                    let (_, exp, key) = k.value();
                    v.push((exp, key.to_owned()));
                    if v.len() >= budget {
                        break;
                    }
                }
                v
            };
            budget -= stale.len();
            for (exp, key) in stale {
                t.qdedup_exp()?.remove((w.id, exp, key.as_str()))?;
                t.qdedup()?.remove((w.id, key.as_str()))?;
            }
            if budget == 0 {
                return Ok(true);
            }
        }
        for (s, w) in self.state.streams.iter().enumerate() {
            let retention = self.shared.streams[s].config.retention.as_millis() as u64;
            for p in 0..w.parts.len() as u32 {
                let mut old = Vec::new();
                for row in t.srec()?.range((w.id, p, 0)..=(w.id, p, u64::MAX))? {
                    let (k, v) = row?;
                    if old.len() >= budget
                        || StreamRecord::decode(v.value())?
                            .ts_ms
                            .saturating_add(retention)
                            > now
                    {
                        break;
                    }
                    old.push(k.value().2);
                }
                budget -= old.len();
                for seq in old {
                    t.srec()?.remove((w.id, p, seq))?;
                }
                if budget == 0 {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn group(
        &self,
        t: &mut Tables<'_>,
        stream: usize,
        group: &str,
    ) -> Result<(BTreeMap<String, u64>, Vec<LeaseState>), StoreError> {
        let w = &self.state.streams[stream];
        let mut members = BTreeMap::new();
        for row in t
            .smember()?
            .range((w.id, group, "")..=(w.id, group, "\u{10ffff}"))?
        {
            let (k, v) = row?;
            members.insert(k.value().2.to_owned(), v.value());
        }
        let mut leases = Vec::with_capacity(w.parts.len());
        for p in 0..w.parts.len() as u32 {
            leases.push(match t.slease()?.get((w.id, group, p))? {
                Some(v) => decode_lease(v.value())?,
                None => LeaseState::default(),
            });
        }
        Ok((members, leases))
    }

    fn save_members(
        &self,
        t: &mut Tables<'_>,
        stream: usize,
        group: &str,
        before: &BTreeMap<String, u64>,
        after: &BTreeMap<String, u64>,
    ) -> Result<(), StoreError> {
        let id = self.state.streams[stream].id;
        for name in before.keys().filter(|n| !after.contains_key(*n)) {
            t.smember()?.remove((id, group, name.as_str()))?;
        }
        for (name, exp) in after {
            if before.get(name) != Some(exp) {
                t.smember()?.insert((id, group, name.as_str()), *exp)?;
            }
        }
        Ok(())
    }

    fn acquire(
        &mut self,
        t: &mut Tables<'_>,
        stream: usize,
        group: &str,
        consumer: &str,
        ttl_ms: u64,
        now: u64,
    ) -> Result<Vec<Lease>, StoreError> {
        let (before, mut leases) = self.group(t, stream, group)?;
        let mut members = before.clone();
        let (mine, changed) = leases::acquire(&mut members, &mut leases, consumer, now, ttl_ms);
        self.save_members(t, stream, group, &before, &members)?;
        let id = self.state.streams[stream].id;
        for (p, l) in leases.iter().enumerate() {
            if changed[p] {
                t.slease()?
                    .insert((id, group, p as u32), encode_lease(l).as_slice())?;
            }
        }
        Ok(mine)
    }

    #[allow(clippy::too_many_arguments)]
    fn checkpoint(
        &mut self,
        t: &mut Tables<'_>,
        stream: usize,
        group: &str,
        consumer: &str,
        partition: u32,
        token: u64,
        sequence: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let id = self.state.streams[stream].id;
        let Some(mut lease) = t
            .slease()?
            .get((id, group, partition))?
            .map(|v| decode_lease(v.value()))
            .transpose()?
        else {
            return Ok(false);
        };
        if !leases::checkpoint(&mut lease, consumer, token, sequence, now) {
            return Ok(false);
        }
        t.slease()?
            .insert((id, group, partition), encode_lease(&lease).as_slice())?;
        Ok(true)
    }

    fn leave(
        &mut self,
        t: &mut Tables<'_>,
        stream: usize,
        group: &str,
        consumer: &str,
    ) -> Result<(), StoreError> {
        let (before, mut leases) = self.group(t, stream, group)?;
        let mut members = before.clone();
        leases::leave(&mut members, &mut leases, consumer);
        self.save_members(t, stream, group, &before, &members)?;
        let id = self.state.streams[stream].id;
        for (p, l) in leases.iter().enumerate() {
            t.slease()?
                .insert((id, group, p as u32), encode_lease(l).as_slice())?;
        }
        Ok(())
    }

    fn apply_effects(&self, mut fx: Effects) {
        for (q, seq) in fx.appended {
            let rt = &self.shared.queues[q];
            if let Ok(mut st) = rt.state.lock() {
                st.committed = st.committed.max(seq);
                st.extend_tail(fx.tail.remove(&q).unwrap_or_default());
            }
            rt.notify.notify_waiters();
        }
        for (q, seqs) in fx.expired {
            let rt = &self.shared.queues[q];
            if let Ok(mut st) = rt.state.lock() {
                for seq in seqs {
                    st.forget(seq);
                }
            }
        }
        for q in fx.touched {
            let w = &self.state.queues[q];
            let c = &self.shared.queues[q].counters;
            c.msgs.store(w.msgs, Ordering::Relaxed);
            c.delayed.store(w.delayed, Ordering::Relaxed);
            c.dead_lettered.store(w.dead_lettered, Ordering::Relaxed);
        }
        if let Some(due) = fx.next_due {
            let prev = self.shared.next_due.fetch_min(due, Ordering::SeqCst);
            if due < prev {
                self.shared.scheduler.notify_one();
            }
        }
        for ((s, p), next) in fx.stream_next {
            let part = &self.shared.streams[s].partitions[p as usize];
            part.next.fetch_max(next, Ordering::SeqCst);
            part.notify.notify_waiters();
        }
    }
}
