//! The redb store: one database file per node holding all of its state.
//!
//! Every table is declared in [`tables`]; values are postcard-encoded
//! records (see [`crate::records`]) except openmls's own entities, which
//! need a self-describing format (MessagePack; JSON in databases written
//! before, still read; see [`crate::mls::storage`]). The schema version is checked when the file is opened.
//!
//! Atomicity rule (DESIGN.md section 6): one logical operation is one write
//! transaction. [`Store::write`] runs a closure inside a write transaction on
//! tokio's blocking pool and commits it durably; if the closure fails, the
//! transaction is aborted and nothing of it is kept. Closures must do no
//! network I/O. Reads ([`Store::read`]) see a consistent snapshot and never
//! wait for a writer.
//!
//! Group commit: operations that queue while a commit is under way are run
//! one after the other in one write transaction and made durable by one
//! commit (what a commit costs is mostly its fsync and one set of pages per
//! table it changed). Each is still all or nothing: if any of them fails,
//! that transaction is dropped and each operation runs again in its own,
//! in order, so a failure touches no other. That is why an operation is a
//! `Fn`: it may run twice, and must change nothing outside its transaction.

use std::borrow::Borrow;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{de::DeserializeOwned, Serialize};

use crate::seal::SealKey;

/// Version of the layout of the tables and records below. Bump it when a
/// stored format changes incompatibly. 3: `tables::GROUP_IDS` (a version 2
/// database is migrated on open: the index is built from its records; a
/// node of version 2 refuses a version 3 database, whose index it would
/// not keep).
pub const SCHEMA_VERSION: u32 = 3;

/// META key of the seed of this node's service key (see `crate::seal`).
const SERVICE_KEY: &str = "service_key_seed";

/// The tables. Keys are fixed-size where possible so that ranges are cheap.
pub mod tables {
    use redb::TableDefinition;

    /// Node-wide values: the schema version.
    pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    /// Proton id → `ProtonRecord`.
    pub const PROTONS: TableDefinition<[u8; 8], &[u8]> = TableDefinition::new("protons");
    /// Group proton id → `GroupProtonRecord`.
    pub const GROUPS: TableDefinition<[u8; 8], &[u8]> = TableDefinition::new("groups");
    /// (MLS group id, group proton id) for each group proton not gone: which
    /// of ours is in an MLS group, without reading every group record.
    /// Written with the records (`changes`); built from them once when a
    /// database made before it is opened.
    pub const GROUP_IDS: TableDefinition<(&[u8], [u8; 8]), ()> = TableDefinition::new("group_ids");
    /// (proton id, context) → group proton id: where envelopes to an address
    /// derived from that proton's address with that context go.
    pub const DERIVED_ROUTES: TableDefinition<([u8; 8], [u8; 16]), [u8; 8]> =
        TableDefinition::new("derived_routes");
    /// (group proton id, epoch) → the accepted commit that ended that epoch,
    /// as the ordering service signed it: served to members who fell behind.
    pub const ORDERED_LOG: TableDefinition<([u8; 8], u64), &[u8]> =
        TableDefinition::new("ordered_log");
    /// Proton id → `Trust`, where not normal. Kept apart from the proton's
    /// record (which its actor caches) because others write it.
    pub const TRUST: TableDefinition<[u8; 8], &[u8]> = TableDefinition::new("trust");
    /// Proton id → `Vec<Attestation>`: attestations linking it to our other
    /// relationships (local equivalences, merges).
    pub const LINKS: TableDefinition<[u8; 8], &[u8]> = TableDefinition::new("links");
    /// Proton id → the proton it was merged into. A retired relationship
    /// sends nothing; its history stays readable.
    pub const RETIRED: TableDefinition<[u8; 8], [u8; 8]> = TableDefinition::new("retired");
    /// Merge request id → `MergeRecord`: merges peers asked us for.
    pub const MERGES: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("merges");
    /// Ticket id → `TicketRecord`: invitations this node made.
    pub const TICKETS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("tickets");
    /// Ticket id → proton id: invitations this node accepted (each works once).
    pub const ACCEPTED_TICKETS: TableDefinition<[u8; 16], [u8; 8]> =
        TableDefinition::new("accepted_tickets");
    /// Delivery address → `AddressRecord`: what this node's receiving service resolves.
    pub const ADDRESSES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("addresses");
    /// (conversation, sequence) → `HistoryEntry`, in the order stored.
    pub const HISTORY: TableDefinition<([u8; 8], u64), &[u8]> = TableDefinition::new("history");
    /// Sequence → `OutboxEntry`: envelopes not yet acknowledged by their receiver.
    pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
    /// Sequence → `InboxEntry`: envelopes acknowledged but not yet processed.
    pub const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
    /// openmls storage, namespaced per proton / group proton (see `crate::mls`).
    pub const MLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mls");
}

/// Builds `tables::GROUP_IDS` from the group records (migrating from
/// version 2, which had records and no index).
pub(crate) fn index_group_ids(tx: &WriteTransaction) -> Result<(), StoreError> {
    let groups = tx.open_table(tables::GROUPS)?;
    let mut index = tx.open_table(tables::GROUP_IDS)?;
    for entry in groups.iter()? {
        let (_, value) = entry?;
        let head: crate::records::GroupHead = decode(value.value(), "group")?;
        if head.state != crate::records::GroupState::Gone {
            index.insert((head.group_id.as_slice(), head.id.0), ())?;
        }
    }
    Ok(())
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database is in use by another process: is a daemon already running on this data directory?")]
    InUse,
    #[error("the database was written by another version of protonode (schema {found}; this build reads schema {expected}); use a matching protonode or a new data directory")]
    SchemaMismatch { found: u32, expected: u32 },
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("a stored {what} could not be decoded: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("a {what} could not be encoded: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("the store's worker thread failed: {0}")]
    Worker(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse,
            other => StoreError::Db(other.into()),
        }
    }
}

/// Handle to the node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    /// The database file, to tell nodes apart in logs.
    name: Arc<str>,
    writes: Arc<Mutex<Writes>>,
}

/// Operations waiting to be written, and whether a writer is at work.
#[derive(Default)]
struct Writes {
    queued: Vec<Box<dyn Job>>,
    writing: bool,
}

/// A queued write operation (see [`Store::write_then`]).
trait Job: Send {
    /// Runs the operation in `tx`. It may run again in another transaction
    /// when the one it ran in is dropped.
    fn run(&mut self, tx: &WriteTransaction) -> Result<(), StoreError>;
    /// The transaction it last ran in was committed (`Ok`), or not.
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
}

struct Operation<R, F, A> {
    f: F,
    after: Option<A>,
    result: Option<R>,
    reply: Option<tokio::sync::oneshot::Sender<Result<R, StoreError>>>,
}

impl<R, F, A> Job for Operation<R, F, A>
where
    F: Fn(&WriteTransaction) -> Result<R, StoreError> + Send,
    A: FnOnce(&mut R) + Send,
    R: Send,
{
    fn run(&mut self, tx: &WriteTransaction) -> Result<(), StoreError> {
        self.result = None;
        self.result = Some((self.f)(tx)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, outcome: Result<(), StoreError>) {
        let answer = outcome.and_then(|()| {
            let mut result = self
                .result
                .take()
                .ok_or_else(|| StoreError::Worker("a write finished without running".into()))?;
            if let Some(after) = self.after.take() {
                after(&mut result);
            }
            Ok(result)
        });
        if let Some(reply) = self.reply.take() {
            // The caller may have gone; what was written stays written.
            let _ = reply.send(answer);
        }
    }
}

/// The writer's turn on the blocking pool. Dropped without running (the
/// runtime shutting down before it started), it leaves no write waiting on
/// a writer that will never come: it fails what is queued (each caller
/// hears that the writer stopped) and lets the next write start another.
struct Writer(Option<Store>);

impl Writer {
    fn run(mut self) {
        if let Some(store) = &self.0 {
            store.write_queued();
        }
        // Done: the writer let go of the queue itself.
        self.0 = None;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(store) = self.0.take() {
            let mut writes = store.lock_writes();
            writes.queued.clear();
            writes.writing = false;
        }
    }
}

/// Runs `job` in `tx`; a panic in it fails it like an error.
fn run_caught(job: &mut dyn Job, tx: &WriteTransaction) -> Result<(), StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(tx)))
        .unwrap_or_else(|_| Err(StoreError::Worker("a write operation panicked".into())))
}

/// Reports `outcome` to `job`; a panic in its follow-up is contained.
fn finish_caught(job: Box<dyn Job>, outcome: Result<(), StoreError>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.finish(outcome))).is_err() {
        tracing::error!("the follow-up of a committed write panicked");
    }
}

impl Store {
    /// Opens (or creates) the database at `path`, creates missing tables and
    /// checks the schema version.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let store = Self {
            db: Arc::new(db),
            name: path.display().to_string().into(),
            writes: Arc::default(),
        };
        store.write_blocking(|tx| {
            let mut migrate_from_2 = false;
            let mut meta = tx.open_table(tables::META)?;
            let found = meta
                .get("schema_version")?
                .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
                .map(u32::from_be_bytes);
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_be_bytes().as_slice())?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(2) => {
                    migrate_from_2 = true;
                    meta.insert("schema_version", SCHEMA_VERSION.to_be_bytes().as_slice())?;
                }
                Some(found) => {
                    return Err(StoreError::SchemaMismatch {
                        found,
                        expected: SCHEMA_VERSION,
                    })
                }
            }
            if meta.get(SERVICE_KEY)?.is_none() {
                let key = SealKey::generate();
                meta.insert(SERVICE_KEY, key.seed().as_slice())?;
            }
            drop(meta);
            // Create every table so readers never meet a missing one.
            tx.open_table(tables::PROTONS)?;
            tx.open_table(tables::GROUPS)?;
            tx.open_table(tables::GROUP_IDS)?;
            if migrate_from_2 {
                index_group_ids(tx)?;
            }
            tx.open_table(tables::DERIVED_ROUTES)?;
            tx.open_table(tables::ORDERED_LOG)?;
            tx.open_table(tables::MERGES)?;
            tx.open_table(tables::TRUST)?;
            tx.open_table(tables::LINKS)?;
            tx.open_table(tables::RETIRED)?;
            tx.open_table(tables::TICKETS)?;
            tx.open_table(tables::ACCEPTED_TICKETS)?;
            tx.open_table(tables::ADDRESSES)?;
            tx.open_table(tables::HISTORY)?;
            tx.open_table(tables::OUTBOX)?;
            tx.open_table(tables::INBOX)?;
            tx.open_table(tables::MLS)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// This node's receiving-service key for derived addresses (made when
    /// the database was created).
    pub fn service_key(&self) -> Result<SealKey, StoreError> {
        self.read(|tx| {
            let meta = tx.open_table(tables::META)?;
            let seed = meta
                .get(SERVICE_KEY)?
                .and_then(|v| <[u8; 32]>::try_from(v.value()).ok())
                .ok_or_else(|| StoreError::Worker("the service key is missing".into()))?;
            Ok(SealKey::from_seed(seed))
        })
    }

    /// How many envelopes are acknowledged and not yet processed.
    pub fn inbox_len(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata as _;
        self.read(|tx| Ok(tx.open_table(tables::INBOX)?.len()?))
    }

    /// Runs `f` on a consistent snapshot.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_read()?;
        f(&tx)
    }

    /// Runs `f` in a write transaction and commits durably, on the calling
    /// thread. For start-up and tests; async code uses [`Store::write`].
    pub fn write_blocking<R>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_write()?;
        match f(&tx) {
            Ok(r) => {
                tracing::trace!(target: crate::TIMELINE, store = %self.name, "commit: changes written");
                tx.commit()?;
                tracing::trace!(target: crate::TIMELINE, store = %self.name, "commit: durable");
                Ok(r)
            }
            Err(e) => {
                if let Err(abort) = tx.abort() {
                    tracing::warn!(error = %abort, "aborting a failed write transaction failed");
                }
                Err(e)
            }
        }
    }

    /// Runs `f` in a write transaction on tokio's blocking pool and commits
    /// durably: when this returns `Ok`, the operation survives a crash.
    /// Operations queued meanwhile share the transaction (see the module's
    /// notes): `f` may run twice and must change nothing outside `tx`.
    pub async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: Fn(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.write_then(f, |_| {}).await
    }

    /// Like [`Store::write`], and runs `after` on the writer's thread as
    /// soon as the commit is durable, before the caller is woken. For work
    /// that may only happen after the commit and should not wait for the
    /// caller: answering a peer, handing queued envelopes to the sender.
    pub async fn write_then<R, F, A>(&self, f: F, after: A) -> Result<R, StoreError>
    where
        F: Fn(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
        A: FnOnce(&mut R) + Send + 'static,
        R: Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut writes = self.lock_writes();
            writes.queued.push(Box::new(Operation {
                f,
                after: Some(after),
                result: None,
                reply: Some(reply),
            }));
            !std::mem::replace(&mut writes.writing, true)
        };
        if start {
            let writer = Writer(Some(self.clone()));
            tokio::task::spawn_blocking(move || writer.run());
        }
        answer
            .await
            .map_err(|_| StoreError::Worker("the writer stopped".into()))?
    }

    fn lock_writes(&self) -> MutexGuard<'_, Writes> {
        // Nothing panics while holding it; if something did, the queue
        // itself is still whole.
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer: commits what is queued, all of it at once, until nothing is.
    fn write_queued(&self) {
        loop {
            let jobs = {
                let mut writes = self.lock_writes();
                if writes.queued.is_empty() {
                    writes.writing = false;
                    return;
                }
                std::mem::take(&mut writes.queued)
            };
            if jobs.len() == 1 {
                jobs.into_iter().for_each(|job| self.write_alone(job));
            } else {
                self.write_together(jobs);
            }
        }
    }

    fn write_alone(&self, mut job: Box<dyn Job>) {
        let outcome = self.write_blocking(|tx| run_caught(job.as_mut(), tx));
        finish_caught(job, outcome);
    }

    /// One transaction for all of `jobs`; if any fails (or the commit
    /// does), each runs again alone, in order.
    fn write_together(&self, mut jobs: Vec<Box<dyn Job>>) {
        let together = self.write_blocking(|tx| {
            jobs.iter_mut()
                .try_for_each(|job| run_caught(job.as_mut(), tx))
        });
        match together {
            Ok(()) => {
                for job in jobs {
                    finish_caught(job, Ok(()));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = jobs.len(), "a shared write failed; writing each alone");
                for job in jobs {
                    self.write_alone(job);
                }
            }
        }
    }
}

impl Store {
    /// The database file's path, to tell nodes apart in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A digest of the contents of every table: equal digests mean equal
    /// contents. Tests use it to prove that refused input changed nothing,
    /// and that a failed operation left exactly the state before it.
    pub fn digest(&self) -> Result<[u8; 32], StoreError> {
        use sha2::{Digest, Sha256};
        fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
            tx: &ReadTransaction,
            def: redb::TableDefinition<K, V>,
            hash: &mut Sha256,
        ) -> Result<(), StoreError> {
            use redb::TableHandle;
            hash.update(def.name().as_bytes());
            for entry in tx.open_table(def)?.iter()? {
                let (k, v) = entry?;
                let (k, v) = (k.value(), v.value());
                let (k, v) = (K::as_bytes(&k), V::as_bytes(&v));
                hash.update((k.as_ref().len() as u64).to_be_bytes());
                hash.update(k.as_ref());
                hash.update((v.as_ref().len() as u64).to_be_bytes());
                hash.update(v.as_ref());
            }
            Ok(())
        }
        self.read(|tx| {
            let mut h = Sha256::new();
            table(tx, tables::META, &mut h)?;
            table(tx, tables::PROTONS, &mut h)?;
            table(tx, tables::GROUPS, &mut h)?;
            table(tx, tables::GROUP_IDS, &mut h)?;
            table(tx, tables::DERIVED_ROUTES, &mut h)?;
            table(tx, tables::ORDERED_LOG, &mut h)?;
            table(tx, tables::MERGES, &mut h)?;
            table(tx, tables::TRUST, &mut h)?;
            table(tx, tables::LINKS, &mut h)?;
            table(tx, tables::RETIRED, &mut h)?;
            table(tx, tables::TICKETS, &mut h)?;
            table(tx, tables::ACCEPTED_TICKETS, &mut h)?;
            table(tx, tables::ADDRESSES, &mut h)?;
            table(tx, tables::HISTORY, &mut h)?;
            table(tx, tables::OUTBOX, &mut h)?;
            table(tx, tables::INBOX, &mut h)?;
            table(tx, tables::MLS, &mut h)?;
            Ok(h.finalize().into())
        })
    }
}

/// Reads and decodes one postcard record.
pub fn get<'k, K, T, Tb>(
    table: &Tb,
    key: impl Borrow<K::SelfType<'k>>,
    what: &'static str,
) -> Result<Option<T>, StoreError>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
    Tb: ReadableTable<K, &'static [u8]>,
{
    match table.get(key)? {
        Some(v) => decode(v.value(), what).map(Some),
        None => Ok(None),
    }
}

/// Encodes and writes one postcard record.
pub fn put<'k, K, T>(
    table: &mut redb::Table<'_, K, &'static [u8]>,
    key: impl Borrow<K::SelfType<'k>>,
    value: &T,
    what: &'static str,
) -> Result<(), StoreError>
where
    K: redb::Key + 'static,
    T: Serialize,
{
    let bytes = encode(value, what)?;
    table.insert(key, bytes.as_slice())?;
    Ok(())
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

pub fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|source| StoreError::Encode { what, source })
}

/// The next free key of a table keyed by a sequence number.
pub fn next_seq<Tb: ReadableTable<u64, &'static [u8]>>(table: &Tb) -> Result<u64, StoreError> {
    Ok(table.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    #[test]
    fn schema_version_is_checked_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path).unwrap();
        store
            .write_blocking(|tx| {
                let mut meta = tx.open_table(tables::META)?;
                meta.insert("schema_version", 99u32.to_be_bytes().as_slice())?;
                Ok(())
            })
            .unwrap();
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::SchemaMismatch {
                found: 99,
                expected: SCHEMA_VERSION
            })
        ));
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _first = Store::open(&path).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::InUse)));
    }

    /// Writes queued together share a commit, and one that fails among
    /// them leaves nothing, as alone, while every other one is written and
    /// answered with its own result, its follow-up run once.
    #[actix_rt::test]
    async fn writes_queued_together_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let followed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writes: Vec<_> = (0..40u64)
            .map(|i| {
                let followed = followed.clone();
                store.write_then(
                    move |tx| {
                        let mut t = tx.open_table(tables::OUTBOX)?;
                        t.insert(i, b"row".as_slice())?;
                        if i == 17 {
                            return Err(StoreError::Worker("injected failure".into()));
                        }
                        Ok(i * 2)
                    },
                    move |_| {
                        followed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    },
                )
            })
            .collect();
        let results = futures::future::join_all(writes).await;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(doubled) => assert_eq!(doubled, i as u64 * 2),
                Err(e) => assert_eq!(i, 17, "{e}"),
            }
        }
        assert_eq!(followed.load(std::sync::atomic::Ordering::SeqCst), 39);
        let keys: Vec<u64> = store
            .read(|tx| {
                let t = tx.open_table(tables::OUTBOX)?;
                let mut keys = Vec::new();
                for row in t.iter()? {
                    keys.push(row?.0.value());
                }
                Ok(keys)
            })
            .unwrap();
        assert_eq!(keys, (0..40).filter(|&i| i != 17).collect::<Vec<_>>());
    }

    /// A writer that never runs (its runtime shut down first) fails what
    /// waits for it, and the next write starts another.
    #[actix_rt::test]
    async fn a_writer_that_never_ran_strands_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let (reply, answer) = tokio::sync::oneshot::channel::<Result<(), StoreError>>();
        {
            let mut writes = store.lock_writes();
            writes.queued.push(Box::new(Operation {
                f: |_: &WriteTransaction| Ok(()),
                after: Some(|_: &mut ()| {}),
                result: None,
                reply: Some(reply),
            }));
            writes.writing = true;
        }
        drop(Writer(Some(store.clone())));
        // Bounded: what this test guards against is a wait without end.
        let bound = std::time::Duration::from_secs(10);
        let heard = tokio::time::timeout(bound, answer).await;
        assert!(
            matches!(heard, Ok(Err(_))),
            "the caller hears the writer stopped"
        );
        let next = store.write(|tx| {
            tx.open_table(tables::OUTBOX)?
                .insert(1, b"row".as_slice())?;
            Ok(())
        });
        tokio::time::timeout(bound, next)
            .await
            .expect("the next write starts a writer")
            .unwrap();
    }

    #[test]
    fn a_failed_operation_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let result: Result<(), _> = store.write_blocking(|tx| {
            let mut t = tx.open_table(tables::OUTBOX)?;
            t.insert(1, b"half".as_slice())?;
            Err(StoreError::Worker("injected failure".into()))
        });
        assert!(result.is_err());
        let len = store
            .read(|tx| Ok(tx.open_table(tables::OUTBOX)?.len()?))
            .unwrap();
        assert_eq!(len, 0);
    }
}
