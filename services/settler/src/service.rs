//! The settler at run time.
//!
//! - **Books.** It folds PAYMENTS (its own log) into a [`Ledger`] and WORKERS into payees (address, price),
//!   both read to their heads before it does anything, then follows TASKS from the beginning: each
//!   TaskCompleted whose task has not accrued yields one PaymentAccrued (usage × the worker's price).
//! - **One settlement at a time.** A batch is planned only while none is open. Its SettlementPrepared, with
//!   the signed message, is published *before* the message is sent, fenced on the PAYMENTS stream's last
//!   sequence: it is stored only if nothing was appended to PAYMENTS since this settler last read it, so two
//!   settlers (or a stale one) can never put the same accruals into two batches.
//! - **Driving an open settlement.** Find the wallet transaction whose inbound message has the settlement's
//!   hash → SettlementConfirmed, with every transfer checked against the transaction's outgoing messages
//!   (a transfer the wallet dropped, for lack of balance, is reported and not marked paid). Not found and
//!   the message still acceptable (wallet seqno unchanged, before valid_until) → resend the identical bytes.
//!   Not found and no longer acceptable (valid_until passed with the seqno unchanged, or the seqno moved on
//!   and none of the wallet's transactions since the batch was prepared carries it) → SettlementExpired; its
//!   accruals are pending again and go into a new batch.
//! - **The chain never holds up the books.** Each call to the TON API (reading the seqno, checking an open
//!   settlement, sending its message) runs as a job beside the main loop, one at a time, while completions
//!   go on accruing; its answer is acted on (events published, fenced as above) back in the main loop. On a
//!   busy chain a check or a send takes seconds, and accruals waiting on it were the pool's payment limit.
//! - **Bounded memory: the accrual window.** A completion accrues only if its task was submitted within the
//!   window (a week by default; the task id is a UUIDv7, so its age is known), and paid task ids older than
//!   that are forgotten ([`crate::ledger`] explains why this cannot pay twice). A restart reads TASKS from the
//!   start again: every completion older than the window is refused, and the newer ones find their accruals.
//! - A crash anywhere loses nothing: everything it knows is in the log and on chain, and a restart resumes
//!   the open settlement by resending the recorded message.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bus::{Bus, Follower, Publisher, PublisherConfig};
use events::ids::{SettlementId, TaskId, WorkerId};
use events::money::Nanoton;
use events::payments::{
    FailedTransfer, PaymentAccrued, SettlementConfirmed, SettlementExpired, SettlementPrepared,
    SettlementSubmitted,
};
use events::tasks::TaskCompleted;
use events::{
    CodecConfig, Envelope, Event, EventRecord, Partitions, ProducerId, Stream, Timestamp,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ledger::{BatchPolicy, Inadmissible, Ledger, Payee, Settlement, SettlementStatus};
use crate::toncenter::{AccountInfo, SendOutcome, TonError, Toncenter, Transaction};
use crate::wallet::{PoolWallet, same_account};

/// Where a test may stop the settler as if it had been killed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// SettlementPrepared is stored; the message was never sent.
    AfterPrepared,
    /// The message was sent; SettlementSubmitted was not recorded.
    AfterSend,
    /// The transaction is on chain; SettlementConfirmed was not recorded.
    BeforeConfirmed,
}

impl FaultPoint {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "after-prepared" => Some(Self::AfterPrepared),
            "after-send" => Some(Self::AfterSend),
            "before-confirmed" => Some(Self::BeforeConfirmed),
            _ => None,
        }
    }
}

/// Transactions asked for in the first page of a search for a settlement's message, and at most per page.
const SEARCH_FIRST_PAGE: u32 = 2;
const SEARCH_MAX_PAGE: u32 = 32;
/// A search reads at most this many times `search_limit` transactions in all, incoming transfers included.
pub const SEARCH_SCAN_FACTOR: u32 = 50;

#[derive(Debug, Clone)]
pub struct SettlerConfig {
    /// Names this instance as the producer of its events.
    pub instance: String,
    pub policy: BatchPolicy,
    /// A message is valid for this long after it is built (its valid_until).
    pub message_ttl: Duration,
    /// Resend an unconfirmed, still acceptable message this often.
    pub resend_interval: Duration,
    /// After valid_until, wait this much longer before declaring a message expired (clock skew with the
    /// chain).
    pub expiry_grace: Duration,
    /// How long after its submission a task may still accrue; paid task ids older than this are forgotten
    /// (see [`crate::ledger::DEFAULT_ACCRUAL_WINDOW`]).
    pub accrual_window: Duration,
    /// How often batching runs.
    pub tick: Duration,
    /// How often an open settlement is checked on chain (each check is a few API calls).
    pub check_interval: Duration,
    /// At most this many of the wallet's external messages (the pool's own, signed) are searched for a
    /// settlement's message per check; incoming transfers, which anyone can send, do not count (up to
    /// [`SEARCH_SCAN_FACTOR`] times as many transactions in all).
    pub search_limit: u32,
    pub partitions: Partitions,
    /// Testing only: stop there as if killed.
    pub fault: Option<FaultPoint>,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        Self {
            instance: "settler-1".to_owned(),
            policy: BatchPolicy::default(),
            message_ttl: Duration::from_secs(60),
            resend_interval: Duration::from_secs(5),
            expiry_grace: Duration::from_secs(5),
            accrual_window: crate::ledger::DEFAULT_ACCRUAL_WINDOW,
            tick: Duration::from_millis(250),
            check_interval: Duration::from_secs(1),
            search_limit: 400,
            partitions: Partitions::DEFAULT,
            fault: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettlerError {
    #[error("instance name {0:?} is not a valid producer id")]
    Instance(String),
    #[error("invalid batch policy: {0}")]
    Policy(#[from] crate::ledger::PolicyError),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error("publishing to PAYMENTS failed; restart to rebuild from the log: {0}")]
    Publish(String),
    #[error("a follower of {0} stopped")]
    FollowerStopped(&'static str),
    #[error("a call to the TON API panicked or was aborted: {0}")]
    ChainJob(String),
    #[error("stopped at the injected fault point {0:?} (testing)")]
    Fault(FaultPoint),
    #[error(
        "PAYMENTS frame {sequence} cannot be read ({reason}); the settler stops rather than settle without it (is this settler older than the one that wrote it?)"
    )]
    UnreadablePayments { sequence: u64, reason: String },
    #[error(
        "settlement {settlement}: the transaction {tx} has {out} outgoing messages for {payouts} transfers, but {unmatched} transfers match none; not deciding which were paid (check the API's address and amount formats)"
    )]
    Reconcile {
        settlement: SettlementId,
        tx: String,
        out: usize,
        payouts: usize,
        unmatched: usize,
    },
}

impl From<bus::PublishError> for SettlerError {
    fn from(e: bus::PublishError) -> Self {
        SettlerError::Publish(e.to_string())
    }
}

/// What a run did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub accruals: u64,
    /// Completions not accrued because their task was outside the accrual window (or had no age).
    pub refused_completions: u64,
    pub settlements_prepared: u64,
    pub settlements_confirmed: u64,
    pub settlements_expired: u64,
    pub payouts_paid: u64,
    pub transfers_failed: u64,
    pub sends: u64,
}

struct Arrival {
    stream: Stream,
    sequence: u64,
    /// The server's store time of the frame: the books' clock.
    stored_at: Timestamp,
    records: Vec<EventRecord>,
}

/// An attempt the allocator placed.
#[derive(Debug, Clone)]
struct Placed {
    worker: WorkerId,
    /// The allocator's epoch: of two placements of one attempt (a fenced-out allocator's landing late), the
    /// newer epoch's holds, as on the workers.
    epoch: u64,
    /// The task's ceiling: the worker is paid its own price, but never more than this.
    max_price: Nanoton,
}

/// Whether a completion's attempt was allocated to its worker, as far as ALLOCATIONS has been read.
#[derive(Debug, PartialEq, Eq)]
enum Allocated {
    /// Yes: accrue at no more than this price per GPU-second.
    To(Nanoton),
    /// To another worker; or ALLOCATIONS has been read as far as it went when the completion was looked up
    /// (`head`) and holds no such allocation.
    Not,
    /// Not read yet: ALLOCATIONS and TASKS are read side by side, and an allocation is stored before its
    /// completion but may be read after it. Look again later.
    NotReadYet,
}

fn allocated(
    placed: Option<&Placed>,
    worker: &WorkerId,
    head: Option<u64>,
    read: u64,
) -> Allocated {
    match placed {
        Some(p) if p.worker == *worker => Allocated::To(p.max_price),
        Some(_) => Allocated::Not,
        None if head.is_some_and(|h| read >= h) => Allocated::Not,
        None => Allocated::NotReadYet,
    }
}

/// A search of the wallet's transactions for a settlement's message.
enum Search {
    Found(Transaction),
    /// Another signed message used the settlement's seqno.
    UsedBy {
        tx_hash: String,
    },
    /// Not there, and the search reached transactions older than the seqno (or the wallet's first).
    Absent,
    /// Not among the transactions searched, which did not reach that far.
    Inconclusive,
}

struct Settler {
    js: jetstream::Context,
    ton: Toncenter,
    wallet: PoolWallet,
    config: SettlerConfig,
    producer: ProducerId,
    publisher: Publisher,
    codec: CodecConfig,
    ledger: Ledger,
    /// The last PAYMENTS sequence folded into the ledger.
    payments_seq: u64,
    /// Sequences of this settler's own PAYMENTS frames, stored (and applied to the books) but not read back
    /// yet: with them the books are known to be complete up to [`Settler::fence`].
    own_seqs: BTreeSet<u64>,
    /// Receipts of buffered publishes, turned into `own_seqs` once flushed.
    receipts: Vec<bus::Receipt>,
    /// Completions whose worker is not known yet (its registration not read): retried as WORKERS arrives.
    /// Their attempt's allocation was found: with the task's price ceiling it set.
    unpriced: Vec<(Envelope, TaskCompleted, Nanoton)>,
    /// Each task's allocated attempts, from ALLOCATIONS, until the task accrues or ends: a completion is paid
    /// only for an attempt allocated to the worker that reports it, at no more than the task's price ceiling.
    allocations: HashMap<TaskId, Vec<(u32, Placed)>>,
    /// ALLOCATIONS read up to here.
    allocations_seq: u64,
    /// How many allocations are kept before those of tasks outside the window are looked for again (twice
    /// what was left by the last look: amortised, not a scan every tick).
    allocations_pruned_at: usize,
    /// Completions whose allocation is not read yet, with ALLOCATIONS' head once looked up: a completion is
    /// refused only when ALLOCATIONS has been read that far and the allocation is still not there.
    unallocated: Vec<(Envelope, TaskCompleted, Option<u64>)>,
    /// Completions refused since the last tick for want of an allocation to their worker, with the first.
    refused_unallocated: (u64, Option<(TaskId, WorkerId)>),
    /// Completions refused since the last tick although they happened inside the accrual window (their task
    /// took longer than the window, or has no age), with the first of them: reported once a tick.
    refused: (u64, Option<(TaskId, Inadmissible)>),
    /// Completions refused since the last tick that happened before the window's horizon: expected when TASKS
    /// is read again from the start after a restart (they were accrued, paid and forgotten long ago).
    refused_old: u64,
    /// When each open settlement was last sent by this process.
    last_send: HashMap<SettlementId, Instant>,
    /// When the open settlement was last checked on chain.
    last_check: Option<Instant>,
    report: RunReport,
}

/// Runs the settler until `cancel` fires or a fatal error.
pub async fn run(
    bus: Bus,
    ton: Toncenter,
    wallet: PoolWallet,
    config: SettlerConfig,
    cancel: CancellationToken,
) -> Result<RunReport, SettlerError> {
    config.policy.validate()?;
    let producer = ProducerId::new(config.instance.clone())
        .map_err(|_| SettlerError::Instance(config.instance.clone()))?;
    let publisher = Publisher::new(
        bus.jetstream.clone(),
        PublisherConfig {
            linger: Duration::from_millis(2),
            partitions: config.partitions,
            ..PublisherConfig::default()
        },
    )?;
    let js = bus.jetstream.clone();
    let (tx, mut rx) = mpsc::channel::<Result<Arrival, SettlerError>>(256);
    let helpers = CancellationToken::new();
    let _stop_helpers = helpers.clone().drop_guard();

    let accrual_window = config.accrual_window;
    let mut settler = Settler {
        js: js.clone(),
        ton,
        wallet,
        config,
        producer,
        publisher,
        codec: CodecConfig::default(),
        ledger: Ledger::with_accrual_window(accrual_window),
        payments_seq: 0,
        own_seqs: BTreeSet::new(),
        receipts: Vec::new(),
        unpriced: Vec::new(),
        allocations: HashMap::new(),
        allocations_seq: 0,
        allocations_pruned_at: 1_024,
        unallocated: Vec::new(),
        refused_unallocated: (0, None),
        refused: (0, None),
        refused_old: 0,
        last_send: HashMap::new(),
        last_check: None,
        report: RunReport::default(),
    };
    // The books first: WORKERS and PAYMENTS up to their heads as they are now.
    let books = [Stream::Workers, Stream::Payments];
    if !settler
        .read_to_heads(&books, &tx, &mut rx, &helpers, &cancel)
        .await?
    {
        return Ok(settler.report);
    }
    tracing::info!(
        wallet = %settler.wallet.address(),
        accruals = settler.ledger.totals().accruals,
        open = settler.ledger.open_settlements().count(),
        "books read; reading ALLOCATIONS, then following TASKS"
    );
    // Then ALLOCATIONS up to its head, before TASKS: a task's end read before its allocation would leave the
    // allocation kept for nothing, and a completion read before it would have to wait.
    if !settler
        .read_to_heads(&[Stream::Allocations], &tx, &mut rx, &helpers, &cancel)
        .await?
    {
        return Ok(settler.report);
    }
    let follower = Follower::open(&js, Stream::Tasks, Vec::new(), 1).await?;
    tokio::spawn(follow(Stream::Tasks, follower, tx.clone(), helpers.clone()));
    drop(tx);

    let mut tick = tokio::time::interval(settler.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At most one chain job at a time; dropping the set (on any return) aborts it.
    let mut chain: JoinSet<ChainAnswer> = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                settler.flush().await?;
                return Ok(settler.report);
            }
            arrival = rx.recv() => {
                let arrival = arrival.ok_or(SettlerError::FollowerStopped("TASKS/ALLOCATIONS"))??;
                settler.fold(arrival).await?;
            }
            Some(answer) = chain.join_next(), if !chain.is_empty() => {
                let answer = answer.map_err(|e| SettlerError::ChainJob(e.to_string()))?;
                settler.flush().await?;
                // After a check or a send, the next round runs at once rather than at the next tick: a confirmed
                // settlement is followed by the next batch without a tick's wait. It cannot spin: checks keep to
                // `check_interval`, and a seqno answer (which may say the wallet is unavailable) waits for the tick.
                let go_on = matches!(answer, ChainAnswer::Check { .. } | ChainAnswer::Send { .. });
                let next = match settler.on_answer(answer).await? {
                    None if go_on => settler.step().await?,
                    next => next,
                };
                if let Some(job) = next {
                    settler.start(job, &mut chain);
                }
            }
            _ = tick.tick() => {
                settler.flush().await?;
                if chain.is_empty()
                    && let Some(job) = settler.step().await?
                {
                    settler.start(job, &mut chain);
                }
            }
        }
    }
}

/// A call to the TON API, run beside the main loop.
enum ChainJob {
    /// The wallet's next seqno, read before a batch is prepared.
    Seqno,
    /// An open settlement's state on chain: one snapshot of the wallet, then a search of its transactions.
    Check(SettlementId),
    /// A (re)send of a settlement's recorded message.
    Send(SettlementId),
}

/// What a chain job found.
enum ChainAnswer {
    Seqno(Result<WalletNext, TonError>),
    Check {
        id: SettlementId,
        found: Result<(AccountInfo, Search), (&'static str, TonError)>,
    },
    Send {
        id: SettlementId,
        outcome: Result<SendOutcome, TonError>,
    },
}

/// The seqno the next message must carry.
enum WalletNext {
    Seqno {
        seqno: u32,
        deploy: bool,
    },
    /// The wallet is neither active nor deployable (not funded): nothing can be sent.
    Unavailable {
        state: String,
        balance: u64,
    },
}

impl Settler {
    /// Follows `streams` (into `tx`, for good) and folds what arrives until each has been read up to its head
    /// as it is now; `false` when cancelled first.
    async fn read_to_heads(
        &mut self,
        streams: &[Stream],
        tx: &mpsc::Sender<Result<Arrival, SettlerError>>,
        rx: &mut mpsc::Receiver<Result<Arrival, SettlerError>>,
        helpers: &CancellationToken,
        cancel: &CancellationToken,
    ) -> Result<bool, SettlerError> {
        let mut heads = HashMap::new();
        for &stream in streams {
            heads.insert(stream, bus::last_sequence(&self.js, stream).await?);
            let follower = Follower::open(&self.js, stream, Vec::new(), 1).await?;
            tokio::spawn(follow(stream, follower, tx.clone(), helpers.clone()));
        }
        let mut seen: HashMap<Stream, u64> = HashMap::new();
        while heads
            .iter()
            .any(|(s, head)| seen.get(s).copied().unwrap_or(0) < *head)
        {
            let arrival = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                a = rx.recv() => a.ok_or(SettlerError::FollowerStopped("a stream read at start"))??,
            };
            seen.insert(arrival.stream, arrival.sequence);
            self.fold(arrival).await?;
        }
        Ok(true)
    }

    /// Sends what is buffered, waits for the acks, and notes where this settler's frames landed.
    async fn flush(&mut self) -> Result<(), SettlerError> {
        self.publisher.flush().await?;
        for receipt in std::mem::take(&mut self.receipts) {
            let position = receipt.await?;
            if position.sequence > self.payments_seq {
                self.own_seqs.insert(position.sequence);
            }
        }
        Ok(())
    }

    /// The PAYMENTS sequence up to which the books are complete: what was read back, then this settler's own
    /// frames right after it. A settlement is stored only if the stream's last sequence is still this.
    fn fence(&self) -> u64 {
        let mut seq = self.payments_seq;
        while self.own_seqs.contains(&(seq + 1)) {
            seq += 1;
        }
        seq
    }

    async fn fold(&mut self, arrival: Arrival) -> Result<(), SettlerError> {
        self.ledger.observe(arrival.stored_at);
        match arrival.stream {
            Stream::Payments => {
                for record in &arrival.records {
                    self.ledger
                        .apply(&record.event, record.envelope.occurred_at);
                }
                self.payments_seq = self.payments_seq.max(arrival.sequence);
                let read = self.payments_seq;
                self.own_seqs.retain(|seq| *seq > read);
            }
            Stream::Workers => {
                let mut registered = false;
                for record in &arrival.records {
                    if let Event::WorkerRegistered(r) = &record.event {
                        registered = true;
                        self.ledger.register(
                            r.worker_id.clone(),
                            Payee {
                                payout_address: r.payout_address.clone(),
                                price_per_gpu_second: r.price_per_gpu_second,
                            },
                        );
                    }
                }
                // Heartbeats arrive every second: only a registration can price a waiting completion.
                if registered && !self.unpriced.is_empty() {
                    for (envelope, completed, max_price) in std::mem::take(&mut self.unpriced) {
                        self.accrue_allocated(&envelope, &completed, max_price)
                            .await?;
                    }
                }
            }
            Stream::Tasks => {
                for record in &arrival.records {
                    match &record.event {
                        Event::TaskCompleted(c) => self.accrue(&record.envelope, c, None).await?,
                        // Ended without a completion to come: its allocations are of no more use.
                        Event::TaskCancelled(e) => drop(self.allocations.remove(&e.task_id)),
                        Event::TaskExpired(e) => drop(self.allocations.remove(&e.task_id)),
                        Event::TaskRejected(e) => drop(self.allocations.remove(&e.task_id)),
                        // A worker's failure ends only its own attempt (an old attempt's failure, read after
                        // the task went on to another worker, must not drop that worker's allocation); an
                        // operator's ends the task.
                        Event::TaskFailed(e) if !e.retryable => match &e.worker_id {
                            Some(worker) => {
                                if let Some(attempts) = self.allocations.get_mut(&e.task_id) {
                                    attempts
                                        .retain(|(n, p)| !(*n == e.attempt && p.worker == *worker));
                                    if attempts.is_empty() {
                                        self.allocations.remove(&e.task_id);
                                    }
                                }
                            }
                            None => drop(self.allocations.remove(&e.task_id)),
                        },
                        _ => {}
                    }
                }
            }
            Stream::Allocations => {
                for record in &arrival.records {
                    if let Event::TaskAllocated(a) = &record.event
                        && self.ledger.admits(&a.task_id).is_ok()
                        && !self.ledger.is_accrued(&a.task_id)
                    {
                        let placed = Placed {
                            worker: a.worker_id.clone(),
                            epoch: a.allocator_epoch,
                            max_price: a.spec.max_price_per_gpu_second,
                        };
                        let attempts = self.allocations.entry(a.task_id).or_default();
                        match attempts.iter_mut().find(|(n, _)| *n == a.attempt) {
                            Some((_, held)) if held.epoch > placed.epoch => {}
                            Some((_, held)) => *held = placed,
                            None => attempts.push((a.attempt, placed)),
                        }
                    }
                }
                self.allocations_seq = self.allocations_seq.max(arrival.sequence);
                self.retry_unallocated().await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Completions waiting for their allocation that can be decided now: their allocation was read, or
    /// ALLOCATIONS was read as far as it went when they were looked up (then they are refused).
    async fn retry_unallocated(&mut self) -> Result<(), SettlerError> {
        let waiting = std::mem::take(&mut self.unallocated);
        for (envelope, completed, head) in waiting {
            let known = self.placed(&completed).is_some();
            if known || head.is_some_and(|h| self.allocations_seq >= h) {
                self.accrue(&envelope, &completed, head).await?;
            } else {
                self.unallocated.push((envelope, completed, head));
            }
        }
        Ok(())
    }

    /// The allocation of the completion's attempt, if it was read.
    fn placed(&self, completed: &TaskCompleted) -> Option<&Placed> {
        self.allocations
            .get(&completed.task_id)?
            .iter()
            .find(|(n, _)| *n == completed.attempt)
            .map(|(_, p)| p)
    }

    /// One PaymentAccrued per task, the first completion wins; applied to the books at once so a
    /// redelivered or duplicated completion finds it. Only an attempt allocated to the reporting worker
    /// accrues (anyone with a worker's credentials can publish a completion naming any task); `head` is
    /// ALLOCATIONS' head when the completion was first looked up, if it was.
    async fn accrue(
        &mut self,
        envelope: &Envelope,
        completed: &TaskCompleted,
        head: Option<u64>,
    ) -> Result<(), SettlerError> {
        if self.ledger.is_accrued(&completed.task_id) {
            metrics::counter!("settler_duplicate_completions_total").increment(1);
            self.allocations.remove(&completed.task_id);
            return Ok(());
        }
        if let Err(why) = self.ledger.admits(&completed.task_id) {
            self.allocations.remove(&completed.task_id);
            self.refuse(envelope, completed.task_id, why);
            return Ok(());
        }
        let max_price = match allocated(
            self.placed(completed),
            &completed.worker_id,
            head,
            self.allocations_seq,
        ) {
            Allocated::To(max_price) => max_price,
            Allocated::Not => {
                self.refuse_unallocated(completed);
                return Ok(());
            }
            Allocated::NotReadYet => {
                self.unallocated
                    .push((envelope.clone(), completed.clone(), head));
                return Ok(());
            }
        };
        self.accrue_allocated(envelope, completed, max_price).await
    }

    /// [`Settler::accrue`] once the attempt's allocation was found: prices the completion (the worker's
    /// price, at most `max_price`) and accrues it, or keeps it until the worker's registration is read. The
    /// allocation is not looked up again: a task's end read meanwhile must not refuse a completion before it.
    async fn accrue_allocated(
        &mut self,
        envelope: &Envelope,
        completed: &TaskCompleted,
        max_price: Nanoton,
    ) -> Result<(), SettlerError> {
        if self.ledger.is_accrued(&completed.task_id) {
            metrics::counter!("settler_duplicate_completions_total").increment(1);
            return Ok(());
        }
        let Some(payee) = self.ledger.payee(&completed.worker_id) else {
            tracing::warn!(task = %completed.task_id, worker = %completed.worker_id, event_id = %envelope.event_id,
                correlation_id = %envelope.correlation_id, "completion by a worker whose registration is unknown; it accrues once the registration is read");
            self.unpriced
                .push((envelope.clone(), completed.clone(), max_price));
            return Ok(());
        };
        let price = payee.price_per_gpu_second.min(max_price);
        let Some(amount) = completed.usage.gpu_millis.cost(price) else {
            tracing::error!(task = %completed.task_id, gpu_millis = completed.usage.gpu_millis.0, price = price.0,
                event_id = %envelope.event_id, correlation_id = %envelope.correlation_id, "usage × price overflows a nanoton amount; not accrued");
            metrics::counter!("settler_unaccruable_total").increment(1);
            return Ok(());
        };
        let accrued = PaymentAccrued {
            task_id: completed.task_id,
            worker_id: completed.worker_id.clone(),
            attempt: completed.attempt,
            gpu_millis: completed.usage.gpu_millis,
            price_per_gpu_second: price,
            amount,
        };
        let record = EventRecord::caused_by(envelope, self.producer.clone(), accrued);
        // A failed frame is reported by the next flush (every tick), which ends the run.
        self.receipts.push(self.publisher.publish(&record).await?);
        self.ledger
            .apply(&record.event, record.envelope.occurred_at);
        self.allocations.remove(&completed.task_id);
        self.report.accruals += 1;
        metrics::counter!("settler_accruals_total").increment(1);
        metrics::counter!("settler_accrued_nanoton_total").increment(amount.0);
        Ok(())
    }

    /// A completion of an attempt not allocated to its worker: counted, and reported at the next tick.
    fn refuse_unallocated(&mut self, completed: &TaskCompleted) {
        metrics::counter!("settler_unallocated_completions_total").increment(1);
        self.report.refused_completions += 1;
        self.refused_unallocated.0 += 1;
        self.refused_unallocated
            .1
            .get_or_insert((completed.task_id, completed.worker_id.clone()));
    }

    /// A completion that may not accrue ([`Ledger::admits`]): counted, and reported at the next tick.
    fn refuse(&mut self, completion: &Envelope, task: TaskId, why: Inadmissible) {
        metrics::counter!("settler_refused_completions_total").increment(1);
        self.report.refused_completions += 1;
        if completion.occurred_at < self.ledger.horizon() {
            self.refused_old += 1;
        } else {
            self.refused.0 += 1;
            self.refused.1.get_or_insert((task, why));
        }
    }

    /// One round: check the open settlement, or plan the next (reporting parked payouts); what needs the chain
    /// is returned as a job.
    async fn step(&mut self) -> Result<Option<ChainJob>, SettlerError> {
        let totals = self.ledger.totals();
        metrics::gauge!("settler_pending_nanoton").set(totals.pending as f64);
        metrics::gauge!("settler_in_flight_nanoton").set(totals.in_flight as f64);
        metrics::gauge!("settler_parked_nanoton").set(totals.parked as f64);
        // A completion waiting for its worker's registration is refused once its task leaves the window.
        let unpriced = std::mem::take(&mut self.unpriced);
        for (envelope, completed, max_price) in unpriced {
            match self.ledger.admits(&completed.task_id) {
                Ok(()) => self.unpriced.push((envelope, completed, max_price)),
                Err(why) => self.refuse(&envelope, completed.task_id, why),
            }
        }
        metrics::gauge!("settler_unpriced_completions").set(self.unpriced.len() as f64);
        // Completions waiting for their allocation: ALLOCATIONS' head is read once for those not looked up
        // yet; they are decided once it has been read that far. Too old ones are refused as above.
        let waiting = std::mem::take(&mut self.unallocated);
        for (envelope, completed, head) in waiting {
            match self.ledger.admits(&completed.task_id) {
                Ok(()) => self.unallocated.push((envelope, completed, head)),
                Err(why) => self.refuse(&envelope, completed.task_id, why),
            }
        }
        if self.unallocated.iter().any(|u| u.2.is_none()) {
            match bus::last_sequence(&self.js, Stream::Allocations).await {
                Ok(head) => {
                    for u in &mut self.unallocated {
                        u.2.get_or_insert(head);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the head of ALLOCATIONS failed; trying again")
                }
            }
            self.retry_unallocated().await?;
        }
        metrics::gauge!("settler_unallocated_completions").set(self.unallocated.len() as f64);
        // Allocations of tasks that left the window can no longer accrue: whatever was not removed by an
        // accrual or an end (a task cancelled as it was allocated, a completion refused) goes here.
        if self.allocations.len() > self.allocations_pruned_at {
            let ledger = &self.ledger;
            self.allocations
                .retain(|task, _| ledger.admits(task).is_ok());
            self.allocations_pruned_at = (self.allocations.len() * 2).max(1_024);
        }
        metrics::gauge!("settler_allocations_remembered").set(self.allocations.len() as f64);
        if let (count, Some((task, worker))) = std::mem::take(&mut self.refused_unallocated) {
            tracing::warn!(count, first_task = %task, first_worker = %worker,
                "completions not accrued: their attempt was not allocated to the worker that reported them");
        }
        metrics::gauge!("settler_paid_tasks_remembered").set(self.ledger.paid_remembered() as f64);
        if let (count, Some((task, why))) = std::mem::take(&mut self.refused) {
            tracing::error!(count, first_task = %task, reason = %why, horizon_micros = self.ledger.horizon().0,
                "completions not accrued: their tasks are outside the accrual window (--accrual-window-s); check \
                 whether they were paid before accruing them by hand");
        }
        let old = std::mem::take(&mut self.refused_old);
        if old > 0 {
            tracing::info!(
                count = old,
                horizon_micros = self.ledger.horizon().0,
                "completions from before the accrual window's horizon skipped (read again after a restart)"
            );
        }
        let open = self
            .ledger
            .open_settlements()
            .next()
            .map(|s| s.prepared.settlement_id);
        if let Some(open) = open {
            if self
                .last_check
                .is_some_and(|at| at.elapsed() < self.config.check_interval)
            {
                return Ok(None);
            }
            self.last_check = Some(Instant::now());
            return Ok(Some(ChainJob::Check(open)));
        }
        let plan = self.ledger.plan(Timestamp::now(), &self.config.policy);
        for parked in plan.park {
            let record = EventRecord::new(self.producer.clone(), parked.clone());
            tracing::warn!(worker = %parked.worker_id, amount = %parked.amount, reason = %parked.reason,
                event_id = %record.envelope.event_id, "payout parked");
            metrics::counter!("settler_parked_total").increment(1);
            self.receipts.push(self.publisher.publish(&record).await?);
            self.ledger
                .apply(&record.event, record.envelope.occurred_at);
        }
        self.flush().await?;
        // A batch is due: read the seqno first; the batch itself is planned again when it is known.
        Ok(plan.batch.map(|_| ChainJob::Seqno))
    }

    /// Runs `job` beside the main loop, on its own handle to the API.
    fn start(&mut self, job: ChainJob, chain: &mut JoinSet<ChainAnswer>) {
        let ton = self.ton.clone();
        let address = self.wallet.address();
        match job {
            ChainJob::Seqno => {
                chain.spawn(async move { ChainAnswer::Seqno(next_seqno(&ton, &address).await) });
            }
            ChainJob::Check(id) => {
                let Some(s) = self.ledger.settlement(&id) else {
                    return;
                };
                let seqno = s.prepared.wallet_seqno;
                let hash = s.prepared.message_hash.clone();
                let body = crate::wallet::external_body_hash(&s.prepared.signed_message);
                let limit = self.config.search_limit;
                chain.spawn(async move {
                    // One snapshot of the wallet (its seqno, in its data, and the chain time of that state),
                    // read before the search: a message that executes in between is found by the search,
                    // never taken for expired.
                    let found = match ton.account(&address).await {
                        Err(e) => Err(("reading the pool wallet", e)),
                        Ok(snapshot) => search(&ton, &address, seqno, &hash, body, limit)
                            .await
                            .map(|found| (snapshot, found))
                            .map_err(|e| ("searching the wallet's transactions", e)),
                    };
                    ChainAnswer::Check { id, found }
                });
            }
            ChainJob::Send(id) => {
                let Some(s) = self.ledger.settlement(&id) else {
                    return;
                };
                let boc = s.prepared.signed_message.clone();
                self.last_send.insert(id, Instant::now());
                chain.spawn(async move {
                    ChainAnswer::Send {
                        id,
                        outcome: ton.send_boc(&boc).await,
                    }
                });
            }
        }
    }

    /// Acts on a chain job's answer, against the books as they are now; returns the job that follows, if any.
    async fn on_answer(&mut self, answer: ChainAnswer) -> Result<Option<ChainJob>, SettlerError> {
        match answer {
            ChainAnswer::Seqno(Err(e)) => self.transient("reading the wallet's seqno", e),
            ChainAnswer::Seqno(Ok(WalletNext::Unavailable { state, balance })) => {
                tracing::error!(wallet = %self.wallet.address(), %state, balance,
                    "the pool wallet is not active and cannot deploy itself; fund it");
                metrics::counter!("settler_wallet_unavailable_total").increment(1);
                Ok(None)
            }
            ChainAnswer::Seqno(Ok(WalletNext::Seqno { seqno, deploy })) => {
                if self.ledger.open_settlements().next().is_some() {
                    return Ok(None);
                }
                // Planned again: completions accrued while the seqno was read go in too.
                match self
                    .ledger
                    .plan(Timestamp::now(), &self.config.policy)
                    .batch
                {
                    Some(batch) => self.prepare(batch, seqno, deploy).await,
                    None => Ok(None),
                }
            }
            ChainAnswer::Check {
                found: Err((what, e)),
                ..
            } => self.transient(what, e),
            ChainAnswer::Check {
                id,
                found: Ok((snapshot, search)),
            } => match self.ledger.settlement(&id).filter(|s| s.is_open()).cloned() {
                Some(s) => self.drive(&s, snapshot, search).await,
                None => Ok(None),
            },
            ChainAnswer::Send { id, outcome } => match self.ledger.settlement(&id).cloned() {
                Some(s) => self.sent(&s, outcome).await,
                None => Ok(None),
            },
        }
    }

    /// Signs the batch with `seqno` and stores its SettlementPrepared, fenced; the send follows as a job.
    async fn prepare(
        &mut self,
        batch: crate::ledger::Batch,
        seqno: u32,
        deploy: bool,
    ) -> Result<Option<ChainJob>, SettlerError> {
        let now = Timestamp::now();
        let valid_until_s = u32::try_from(
            (now.as_millis() / 1000).saturating_add(self.config.message_ttl.as_secs() as i64),
        )
        .unwrap_or(u32::MAX);
        let transfers: Vec<(&str, u64)> = batch
            .payouts
            .iter()
            .map(|p| (p.destination.as_str(), p.amount.0))
            .collect();
        let payout_count = transfers.len();
        let started = Instant::now();
        let signed = match self
            .wallet
            .sign_transfers(seqno, valid_until_s, &transfers, deploy)
        {
            Ok(signed) => signed,
            Err(e) => {
                // Addresses are checked before batching, so this is a bug: say so loudly, keep the accruals.
                tracing::error!(error = %e, "cannot build the settlement message");
                metrics::counter!("settler_build_errors_total").increment(1);
                return Ok(None);
            }
        };
        metrics::histogram!("settler_sign_seconds").record(started.elapsed().as_secs_f64());
        drop(transfers);
        let message_hash = signed.hash_hex();
        let prepared = SettlementPrepared {
            settlement_id: SettlementId::new(),
            wallet_seqno: seqno,
            valid_until: Timestamp::from_micros(i64::from(valid_until_s) * 1_000_000),
            payouts: batch.payouts,
            signed_message: signed.boc,
            message_hash,
        };
        let id = prepared.settlement_id;
        let record = EventRecord::new(self.producer.clone(), prepared);
        match self.publish_one(&record, Some(self.fence())).await? {
            Fenced::Stored => {}
            Fenced::Behind => {
                tracing::debug!(
                    "PAYMENTS moved since it was last read; planning again once it is read"
                );
                return Ok(None);
            }
        }
        self.ledger
            .apply(&record.event, record.envelope.occurred_at);
        self.report.settlements_prepared += 1;
        metrics::counter!("settler_settlements_total", "outcome" => "prepared").increment(1);
        tracing::info!(settlement = %id, seqno, payouts = payout_count, total = %batch.total,
            reason = batch.reason.as_str(), "settlement prepared");
        self.fault(FaultPoint::AfterPrepared)?;
        Ok(Some(ChainJob::Send(id)))
    }

    /// Records a (re)send of the settlement's message that the API accepted.
    async fn sent(
        &mut self,
        s: &Settlement,
        outcome: Result<SendOutcome, TonError>,
    ) -> Result<Option<ChainJob>, SettlerError> {
        let id = s.prepared.settlement_id;
        match outcome {
            Ok(SendOutcome::Accepted { .. }) => {}
            Ok(SendOutcome::Refused { reason }) => {
                // Usually: already executed (the seqno moved on) or expired. The next check tells which.
                tracing::info!(settlement = %id, %reason, "the message was not accepted");
                return Ok(None);
            }
            Err(e) => return self.transient("sending the settlement", e),
        }
        self.report.sends += 1;
        self.fault(FaultPoint::AfterSend)?;
        let sends = match s.status {
            SettlementStatus::Open { sends } => sends + 1,
            _ => return Ok(None),
        };
        let record = EventRecord::new(
            self.producer.clone(),
            SettlementSubmitted {
                settlement_id: id,
                message_hash: s.prepared.message_hash.clone(),
                send_attempt: sends,
            },
        );
        self.publish_one(&record, None).await?;
        self.ledger
            .apply(&record.event, record.envelope.occurred_at);
        Ok(None)
    }

    /// Decides an open settlement from what a check found on chain: confirmed, expired, resend (as a job), or
    /// wait.
    async fn drive(
        &mut self,
        s: &Settlement,
        snapshot: AccountInfo,
        search: Search,
    ) -> Result<Option<ChainJob>, SettlerError> {
        let id = s.prepared.settlement_id;
        let n = s.prepared.wallet_seqno;
        // A wallet not deployed yet is at seqno 0: the settlement that deploys it (seqno 0, with the state
        // init) is resent and expires by the same rules as any other.
        let seqno = match snapshot.state.as_str() {
            "active" => crate::wallet::seqno_from_data(&snapshot.data),
            "uninitialized" => Some(0),
            _ => None,
        };
        let Some(seqno) = seqno else {
            tracing::warn!(settlement = %id, state = %snapshot.state, "the pool wallet's state shows no seqno; checking again");
            metrics::counter!("settler_ton_errors_total").increment(1);
            return Ok(None);
        };
        // The chain's time of that state; this host's clock only when the API does not say.
        let chain_now_s = snapshot
            .sync_utime
            .unwrap_or_else(|| (Timestamp::now().as_millis() / 1000).max(0) as u64);
        if let Search::Found(tx) = search {
            self.fault(FaultPoint::BeforeConfirmed)?;
            self.confirm(s, &tx).await?;
            return Ok(None);
        }
        let valid_until_s = (s.prepared.valid_until.as_millis() / 1000).max(0) as u64;
        let past_valid_until = chain_now_s > valid_until_s + self.config.expiry_grace.as_secs();
        let expired = match seqno.cmp(&n) {
            // Not executed in a state the chain reached after valid_until: the wallet refuses it from now on.
            std::cmp::Ordering::Equal => past_valid_until,
            std::cmp::Ordering::Greater => match &search {
                // Another message used the seqno: this one can never be accepted.
                Search::UsedBy { .. } => true,
                _ => {
                    tracing::error!(settlement = %id, seqno = n, wallet_seqno = seqno,
                        "the wallet's seqno moved past the settlement's, and the transaction that used it was not found; not rebuilding the batch until it is");
                    metrics::counter!("settler_unresolved_settlements_total").increment(1);
                    false
                }
            },
            // Behind the message's seqno: it cannot execute once valid_until has passed.
            std::cmp::Ordering::Less => past_valid_until,
        };
        if expired {
            let record = EventRecord::new(
                self.producer.clone(),
                SettlementExpired {
                    settlement_id: id,
                    valid_until: s.prepared.valid_until,
                },
            );
            if let Fenced::Behind = self.publish_one(&record, Some(self.fence())).await? {
                return Ok(None);
            }
            self.ledger
                .apply(&record.event, record.envelope.occurred_at);
            self.last_send.remove(&id);
            self.report.settlements_expired += 1;
            metrics::counter!("settler_settlements_total", "outcome" => "expired").increment(1);
            match search {
                Search::UsedBy { tx_hash } => {
                    tracing::warn!(settlement = %id, seqno = n, used_by = %tx_hash,
                    "another message used the settlement's seqno; its accruals go into a new batch")
                }
                _ => tracing::warn!(settlement = %id, seqno = n,
                    "settlement expired unexecuted; its accruals go into a new batch"),
            }
            return Ok(None);
        }
        let due = self
            .last_send
            .get(&id)
            .is_none_or(|at| at.elapsed() >= self.config.resend_interval);
        Ok((seqno == n && chain_now_s < valid_until_s && due).then_some(ChainJob::Send(id)))
    }

    async fn confirm(&mut self, s: &Settlement, tx: &Transaction) -> Result<(), SettlerError> {
        let id = s.prepared.settlement_id;
        let mut unused: Vec<&crate::toncenter::OutMessage> = tx.out_msgs.iter().collect();
        let mut failed = Vec::new();
        for payout in &s.prepared.payouts {
            let found = unused.iter().position(|m| {
                m.value == payout.amount.0 && same_account(&m.destination, &payout.destination)
            });
            match found {
                Some(i) => {
                    unused.swap_remove(i);
                }
                None => {
                    let mut reason = format!(
                        "the transaction sent no transfer of {} to {}",
                        payout.amount, payout.destination
                    );
                    if let Some(skipped) = tx.skipped_actions.filter(|n| *n > 0) {
                        reason.push_str(&format!(
                            " ({skipped} transfers skipped in the action phase: the wallet's balance did not cover them)"
                        ));
                    }
                    failed.push(FailedTransfer {
                        worker_id: payout.worker_id.clone(),
                        reason,
                    });
                }
            }
        }
        // A transfer the wallet skipped leaves no outgoing message, so at most (transfers − messages) can be
        // missing. More unmatched than that means the answer's format was misread, not that they were unpaid:
        // deciding either way could pay twice or lose a payout, so stop and say so.
        let missing = s.prepared.payouts.len().saturating_sub(tx.out_msgs.len());
        if failed.len() > missing {
            return Err(SettlerError::Reconcile {
                settlement: id,
                tx: tx.hash_hex(),
                out: tx.out_msgs.len(),
                payouts: s.prepared.payouts.len(),
                unmatched: failed.len(),
            });
        }
        let paid = s.prepared.payouts.len() - failed.len();
        if !failed.is_empty() {
            let balance = self.ton.balance(&self.wallet.address()).await.ok();
            tracing::error!(settlement = %id, failed = failed.len(), paid, wallet_balance = ?balance,
                "transfers did not go out; their accruals stay unpaid and are retried later");
            metrics::counter!("settler_failed_transfers_total").increment(failed.len() as u64);
        }
        let confirmed = SettlementConfirmed {
            settlement_id: id,
            tx_hash: tx.hash_hex(),
            logical_time: tx.lt,
            failed_transfers: failed,
        };
        self.report.transfers_failed += confirmed.failed_transfers.len() as u64;
        let record = EventRecord::new(self.producer.clone(), confirmed);
        self.publish_one(&record, None).await?;
        self.ledger
            .apply(&record.event, record.envelope.occurred_at);
        self.last_send.remove(&id);
        self.report.settlements_confirmed += 1;
        self.report.payouts_paid += paid as u64;
        metrics::counter!("settler_settlements_total", "outcome" => "confirmed").increment(1);
        metrics::counter!("settler_payouts_paid_total").increment(paid as u64);
        metrics::counter!("settler_fees_nanoton_total").increment(tx.fee);
        tracing::info!(settlement = %id, tx = %tx.hash_hex(), lt = tx.lt, paid, fee = %Nanoton(tx.fee), "settlement confirmed");
        Ok(())
    }

    /// A failed call to the TON API: logged and retried next tick (the state is unchanged).
    fn transient(&self, what: &str, e: TonError) -> Result<Option<ChainJob>, SettlerError> {
        tracing::warn!(error = %e, "{what} failed; retrying");
        metrics::counter!("settler_ton_errors_total").increment(1);
        Ok(None)
    }

    fn fault(&self, point: FaultPoint) -> Result<(), SettlerError> {
        if self.config.fault == Some(point) {
            return Err(SettlerError::Fault(point));
        }
        Ok(())
    }

    /// Publishes one event as its own frame and waits for the ack; with `expected_last`, only if PAYMENTS'
    /// last sequence is still that.
    async fn publish_one(
        &mut self,
        record: &EventRecord,
        expected_last: Option<u64>,
    ) -> Result<Fenced, SettlerError> {
        // Anything buffered goes first, so the stream keeps this settler's order.
        self.flush().await?;
        let frame = events::encode_frame(self.codec, std::slice::from_ref(record))
            .map_err(|e| SettlerError::Publish(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in frame.headers.pairs() {
            headers.insert(name, value.as_str());
        }
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(frame.body.into())
            .headers(headers);
        if let Some(last) = expected_last {
            publish = publish.expected_last_sequence(last);
        }
        let subject = record.subject(self.config.partitions).to_string();
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| SettlerError::Publish(e.to_string()))?;
        match ack.await {
            Ok(ack) => {
                if ack.sequence > self.payments_seq {
                    self.own_seqs.insert(ack.sequence);
                }
                Ok(Fenced::Stored)
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Fenced::Behind),
            Err(e) => Err(SettlerError::Publish(e.to_string())),
        }
    }
}

enum Fenced {
    Stored,
    /// PAYMENTS has events this settler has not read yet.
    Behind,
}

/// Looks for the settlement's message among the wallet's transactions, newest first, down to the one
/// that used its seqno (or an older one).
///
/// The message is the one with `message_hash`, or any external message with the same signed body
/// (`body_hash`): whoever relays a message may lay it out anew (the body inline instead of in a reference),
/// which changes its hash but executes the very same transfers. Only another body with the seqno used it up.
///
/// Pages start small and double: the message sought is almost always among the newest few transactions
/// (one settlement is in flight at a time), and a wallet transaction of 255 transfers is about 100 KB of
/// JSON, so 50 of them overflow the HTTP client's response bound. A page that overflows it is asked again
/// at half the size.
async fn search(
    ton: &Toncenter,
    address: &str,
    n: u32,
    message_hash: &str,
    body_hash: Option<[u8; 32]>,
    search_limit: u32,
) -> Result<Search, TonError> {
    let mut from: Option<(u64, String)> = None;
    // Only the wallet's external messages count against the limit: incoming transfers (anyone can send
    // them, many and cheap) must not push an executed message out of reach.
    let mut searched = 0u32;
    let mut scanned = 0u32;
    let mut page_size = SEARCH_FIRST_PAGE;
    while searched < search_limit && scanned < search_limit.saturating_mul(SEARCH_SCAN_FACTOR) {
        let answer = ton
            .transactions(
                address,
                page_size,
                from.as_ref().map(|(lt, h)| (*lt, h.as_str())),
            )
            .await;
        let page = match answer {
            Err(TonError::Transport(httpc::HttpError::TooLarge { .. })) if page_size > 1 => {
                page_size /= 2;
                continue;
            }
            other => other?,
        };
        page_size = (page_size * 2).min(SEARCH_MAX_PAGE);
        // Paging starts at `from` inclusive: skip the one already seen.
        let fresh: Vec<Transaction> = page
            .into_iter()
            .filter(|t| from.as_ref().is_none_or(|(lt, _)| t.lt < *lt))
            .collect();
        if fresh.is_empty() {
            return Ok(Search::Absent);
        }
        for tx in &fresh {
            if tx
                .in_msg_hash
                .as_deref()
                .is_some_and(|h| hash_matches(h, message_hash))
            {
                return Ok(Search::Found(tx.clone()));
            }
            let used = tx
                .in_msg_external
                .then(|| {
                    tx.in_msg_body
                        .as_deref()
                        .and_then(crate::wallet::signed_request_seqno)
                })
                .flatten();
            match used {
                Some((seqno, _)) if seqno == n => {
                    let theirs = tx.in_msg_body.as_deref().and_then(crate::wallet::body_hash);
                    return Ok(match (body_hash, theirs) {
                        (Some(ours), Some(theirs)) if ours == theirs => Search::Found(tx.clone()),
                        (Some(_), Some(_)) => Search::UsedBy {
                            tx_hash: tx.hash_hex(),
                        },
                        // Cannot tell whether it was ours: never take it for another message.
                        _ => Search::Inconclusive,
                    });
                }
                // Older than any message with this seqno could be.
                Some((seqno, _)) if seqno < n => return Ok(Search::Absent),
                _ => {}
            }
        }
        searched += fresh.iter().filter(|t| t.in_msg_external).count() as u32;
        scanned += fresh.len() as u32;
        let last = &fresh[fresh.len() - 1];
        from = Some((last.lt, last.hash.clone()));
    }
    Ok(Search::Inconclusive)
}

/// The seqno the wallet's next message must carry: its current one, or 0 with the wallet's deployment when it
/// is funded but not deployed yet.
async fn next_seqno(ton: &Toncenter, address: &str) -> Result<WalletNext, TonError> {
    if let Some(seqno) = ton.seqno(address).await? {
        return Ok(WalletNext::Seqno {
            seqno,
            deploy: false,
        });
    }
    let info = ton.account(address).await?;
    Ok(if info.state == "uninitialized" && info.balance > 0 {
        WalletNext::Seqno {
            seqno: 0,
            deploy: true,
        }
    } else {
        WalletNext::Unavailable {
            state: info.state,
            balance: info.balance,
        }
    })
}

/// The API gives hashes in base64; settlements record them in hex.
fn hash_matches(api_hash: &str, hex_hash: &str) -> bool {
    B64.decode(api_hash)
        .map(|b| crate::wallet::hex(&b).eq_ignore_ascii_case(hex_hash))
        .unwrap_or(false)
}

async fn follow(
    stream: Stream,
    mut follower: Follower,
    tx: mpsc::Sender<Result<Arrival, SettlerError>>,
    cancel: CancellationToken,
) {
    let codec = CodecConfig::default();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            next = follower.next() => next,
        };
        let arrival = match next {
            None => Err(SettlerError::FollowerStopped(stream.name())),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(frame)) => match frame.decode(&codec) {
                Ok(records) => Ok(Arrival {
                    stream,
                    sequence: frame.stream_sequence,
                    stored_at: frame.stored_at,
                    records,
                }),
                // The books must hold every PAYMENTS event: one this settler cannot read (say, written by a
                // newer version) could be a settlement it would otherwise pay again.
                Err(e) if stream == Stream::Payments => Err(SettlerError::UnreadablePayments {
                    sequence: frame.stream_sequence,
                    reason: e.to_string(),
                }),
                Err(e) => {
                    tracing::warn!(stream = stream.name(), seq = frame.stream_sequence, error = %e, "skipping an undecodable frame");
                    metrics::counter!("settler_undecodable_frames_total").increment(1);
                    Ok(Arrival {
                        stream,
                        sequence: frame.stream_sequence,
                        stored_at: frame.stored_at,
                        records: Vec::new(),
                    })
                }
            },
        };
        let stop = arrival.is_err();
        if tx.send(arrival).await.is_err() || stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_accrues_only_for_its_workers_allocation_and_waits_until_allocations_are_read() {
        let w = WorkerId::new("w").unwrap();
        let other = WorkerId::new("other").unwrap();
        let placed = Placed {
            worker: w.clone(),
            epoch: 1,
            max_price: Nanoton(7),
        };
        assert_eq!(
            allocated(Some(&placed), &w, None, 0),
            Allocated::To(Nanoton(7))
        );
        assert_eq!(allocated(Some(&placed), &other, None, 0), Allocated::Not);
        // Not read: it waits until ALLOCATIONS is read as far as it went when the completion was looked up.
        assert_eq!(allocated(None, &w, None, 100), Allocated::NotReadYet);
        assert_eq!(allocated(None, &w, Some(101), 100), Allocated::NotReadYet);
        assert_eq!(allocated(None, &w, Some(100), 100), Allocated::Not);
    }
}
