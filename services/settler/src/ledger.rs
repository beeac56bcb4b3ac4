//! The settler's books: every accrual and every settlement, folded from the PAYMENTS stream, and the
//! batching policy that turns pending accruals into the next settlement. Pure: no I/O, no clock.
//!
//! Each accrual (one per task: the first `PaymentAccrued` wins) is in exactly one state:
//! - pending: payable, waiting for a batch (never settled, or its settlement expired or failed, or its
//!   transfer did not go out);
//! - parked: held back with a reason (its worker's payout address cannot receive), reported once;
//! - in flight: carried by a prepared settlement that has not ended;
//! - paid: carried by a confirmed settlement whose transaction sent its worker's transfer.
//!
//! What the books keep is sized for a settler that runs for months: a paid accrual shrinks to its task id
//! (all that is left to know is that it must not accrue again), and an ended settlement drops its signed
//! message and payouts (the log has them); only what is still to be paid is kept whole.
//!
//! **The accrual window** bounds even the paid task ids. Task ids are UUIDv7, minted when the task is
//! submitted, so a task's age is known without remembering it. The books keep a horizon: the newest log
//! time seen (the server's store time of what was read) less the window. A completion accrues only if its
//! task was minted at or after the horizon ([`Ledger::admits`]), and a paid task id is forgotten once its task
//! was minted before it. Both compare the same two things and the horizon never goes back, so a task whose
//! id was forgotten can never accrue again: forgetting cannot cause a second payment, whatever the delay of
//! a duplicate completion, a zombie attempt or a replay of TASKS. The cost is that a task completing more
//! than the window after its submission is not paid automatically; it is refused with an error naming it.
//!
//! A task only moves from pending or parked into a settlement, so no accrual is ever in two live
//! settlements and none is ever paid twice; one that would be (a bug, or a second settler writing without
//! the stream fence) is recorded as an anomaly and left where it was.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use events::Event;
use events::ids::{SettlementId, TaskId, WorkerId};
use events::money::Nanoton;
use events::payments::{
    FailedTransfer, PaymentAccrued, Payout, PayoutParked, SettlementConfirmed, SettlementPrepared,
};
use events::time::Timestamp;
use tonlib_core::TonAddress;

/// A wallet v5r1 message carries at most this many transfers.
pub const MAX_PAYOUTS: usize = 255;

/// How long after its submission a task may still accrue, unless configured: a week.
pub const DEFAULT_ACCRUAL_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a completion may not accrue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inadmissible {
    /// The task id is not a UUIDv7, so its age is unknown.
    NotTimeOrdered,
    /// The task was submitted (its id minted) before the accrual window's horizon.
    TooOld {
        minted: Timestamp,
        horizon: Timestamp,
    },
}

impl fmt::Display for Inadmissible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inadmissible::NotTimeOrdered => {
                f.write_str("the task id is not a UUIDv7, so the task's age is unknown")
            }
            Inadmissible::TooOld { minted, horizon } => write!(
                f,
                "the task was submitted at {} µs, before the accrual window's horizon ({} µs); it may have been \
                 paid and forgotten, so it is not accrued automatically",
                minted.0, horizon.0
            ),
        }
    }
}

/// Where an accrual not yet paid stands (a paid one is only a task id in the books).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccrualState {
    Pending,
    Parked { reason: String },
    InFlight(SettlementId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accrual {
    pub worker_id: WorkerId,
    pub amount: Nanoton,
    pub accrued_at: Timestamp,
    pub state: AccrualState,
}

/// How a settlement ended, if it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettlementStatus {
    /// Prepared; `sends` counts the sends recorded so far (0: not sent yet).
    Open {
        sends: u32,
    },
    Confirmed {
        failed: Vec<FailedTransfer>,
    },
    Expired,
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub prepared: SettlementPrepared,
    pub prepared_at: Timestamp,
    pub status: SettlementStatus,
}

impl Settlement {
    pub fn is_open(&self) -> bool {
        matches!(self.status, SettlementStatus::Open { .. })
    }

    /// Once ended, a settlement keeps its id, seqno, hash and status: its signed message (a few KB) and its
    /// payouts (every task id) are in the log, and nothing decides on them any more.
    fn forget_details(&mut self) {
        self.prepared.signed_message = Vec::new();
        self.prepared.payouts = Vec::new();
    }
}

/// What the settler knows of a worker from WORKERS: where to pay it and at what price it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payee {
    pub payout_address: String,
    pub price_per_gpu_second: Nanoton,
}

/// When a batch closes, and what it may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Close at this many transfers (1..=255).
    pub max_payouts: usize,
    /// Close once the oldest payable accrual is this old.
    pub max_age: Duration,
    /// Close once the batch's total reaches this; a batch never grows past it unless one worker alone does.
    pub max_total: Nanoton,
    /// A worker owed less than this is carried over to a later batch.
    pub min_payout: Nanoton,
    /// A worker whose transfer did not go out (e.g. the wallet ran short) is retried after this long.
    pub failed_retry_after: Duration,
    /// At most this many accruals (task ids) in one settlement, so its event stays well inside a NATS
    /// message; a worker's further accruals wait for the next batch.
    pub max_tasks: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            max_payouts: MAX_PAYOUTS,
            max_age: Duration::from_secs(30),
            max_total: Nanoton(1_000 * Nanoton::PER_TON),
            min_payout: Nanoton(10_000_000),
            failed_retry_after: Duration::from_secs(300),
            max_tasks: 20_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("max payouts must be between 1 and {MAX_PAYOUTS}, not {0}")]
    MaxPayouts(usize),
    #[error("the minimum payout must be at least 1 nanoton")]
    MinPayout,
    #[error("a settlement must be allowed to carry at least one accrual")]
    MaxTasks,
    #[error("the batch cap ({cap}) is below the minimum payout ({min})")]
    CapBelowMinimum { cap: Nanoton, min: Nanoton },
}

impl BatchPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max_payouts == 0 || self.max_payouts > MAX_PAYOUTS {
            return Err(PolicyError::MaxPayouts(self.max_payouts));
        }
        if self.min_payout.0 == 0 {
            return Err(PolicyError::MinPayout);
        }
        if self.max_tasks == 0 {
            return Err(PolicyError::MaxTasks);
        }
        if self.max_total < self.min_payout {
            return Err(PolicyError::CapBelowMinimum {
                cap: self.max_total,
                min: self.min_payout,
            });
        }
        Ok(())
    }
}

/// Why a batch closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Full,
    Age,
    Cap,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Full => "full",
            CloseReason::Age => "age",
            CloseReason::Cap => "cap",
        }
    }
}

/// The next batch: its transfers (workers oldest-owed first) and why it closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub payouts: Vec<Payout>,
    pub total: Nanoton,
    pub reason: CloseReason,
}

/// What batching found: parkings to report (always) and a batch, if one is due.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub park: Vec<PayoutParked>,
    pub batch: Option<Batch>,
}

/// Why an address cannot be paid, or `None` when it can.
pub fn unpayable_reason(address: &str) -> Option<String> {
    match TonAddress::from_str(address) {
        Ok(a) if a.workchain == 0 || a.workchain == -1 => None,
        Ok(a) => Some(format!(
            "payout address {address:?} is on workchain {}, which the pool does not pay to",
            a.workchain
        )),
        Err(e) => Some(format!(
            "payout address {address:?} is not a TON address: {e}"
        )),
    }
}

/// The books. Feed it every PAYMENTS event in stream order ([`Ledger::apply`]) and every registration.
#[derive(Debug)]
pub struct Ledger {
    /// Accruals not paid yet: pending, parked or in flight.
    accruals: HashMap<TaskId, Accrual>,
    /// Tasks whose accrual is paid, minted at or after the horizon: only their ids, so a repeated completion
    /// or accrual finds them. Ordered by id, which is by mint time, so the forgotten are split off at once.
    paid_tasks: BTreeSet<TaskId>,
    /// See [`DEFAULT_ACCRUAL_WINDOW`].
    window: Duration,
    /// The newest log time seen less the window; it never goes back. Tasks minted before it do not accrue.
    horizon: Timestamp,
    /// The horizon at the last pruning.
    pruned_at: Timestamp,
    /// The accruals that are pending or parked: all that batching looks at, however long the history.
    unsettled: HashSet<TaskId>,
    settlements: BTreeMap<SettlementId, Settlement>,
    /// The settlements that have not ended, by (prepared at, id): what each tick looks at, however many ended.
    open: BTreeSet<(Timestamp, SettlementId)>,
    payees: HashMap<WorkerId, Payee>,
    /// Why a registered worker's address cannot be paid (checked once per registration).
    unpayable: HashMap<WorkerId, String>,
    /// Workers whose last transfer failed, and when they may be retried.
    retry_at: HashMap<WorkerId, Timestamp>,
    anomalies: Vec<String>,
    accrued: u128,
    paid: u128,
}

/// Sums the ledger reports, all in nanoton.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub accruals: usize,
    pub accrued: u128,
    pub pending: u128,
    pub parked: u128,
    pub in_flight: u128,
    pub paid: u128,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::with_accrual_window(DEFAULT_ACCRUAL_WINDOW)
    }
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Books whose tasks may accrue for `window` after their submission (see [`Ledger::admits`]).
    pub fn with_accrual_window(window: Duration) -> Self {
        Self {
            accruals: HashMap::new(),
            paid_tasks: BTreeSet::new(),
            window,
            horizon: Timestamp(i64::MIN),
            pruned_at: Timestamp(i64::MIN),
            unsettled: HashSet::new(),
            settlements: BTreeMap::new(),
            open: BTreeSet::new(),
            payees: HashMap::new(),
            unpayable: HashMap::new(),
            retry_at: HashMap::new(),
            anomalies: Vec::new(),
            accrued: 0,
            paid: 0,
        }
    }

    /// Log time has reached `at` (the server's store time of something read): the horizon moves up to `at` less
    /// the window, and what it passed is forgotten: paid task ids, and ended settlements, minted before it.
    pub fn observe(&mut self, at: Timestamp) {
        let horizon = Timestamp(at.0.saturating_sub(micros(self.window)));
        if horizon <= self.horizon {
            return;
        }
        self.horizon = horizon;
        // Pruning walks the ended settlements: once a second of log time is enough.
        if horizon.0.saturating_sub(self.pruned_at.0) < 1_000_000 {
            return;
        }
        self.pruned_at = horizon;
        self.paid_tasks = self
            .paid_tasks
            .split_off(&TaskId::lowest_minted_at(horizon));
        let oldest_kept = SettlementId::lowest_minted_at(horizon);
        self.settlements
            .retain(|id, s| s.is_open() || *id >= oldest_kept);
    }

    /// The horizon: tasks minted before it do not accrue.
    pub fn horizon(&self) -> Timestamp {
        self.horizon
    }

    /// Whether a completion of `task` may accrue: only if the task was submitted inside the accrual window, so
    /// that the books still know whether it was paid.
    pub fn admits(&self, task: &TaskId) -> Result<(), Inadmissible> {
        match task.minted_at() {
            None => Err(Inadmissible::NotTimeOrdered),
            Some(minted) if minted < self.horizon => Err(Inadmissible::TooOld {
                minted,
                horizon: self.horizon,
            }),
            Some(_) => Ok(()),
        }
    }

    /// How many paid task ids the books remember (those minted inside the window).
    pub fn paid_remembered(&self) -> usize {
        self.paid_tasks.len()
    }

    /// A worker's registration (the latest wins). A payable address releases its parked accruals.
    pub fn register(&mut self, worker: WorkerId, payee: Payee) {
        match unpayable_reason(&payee.payout_address) {
            Some(reason) => self.unpayable.insert(worker.clone(), reason),
            None => self.unpayable.remove(&worker),
        };
        self.payees.insert(worker, payee);
    }

    pub fn payee(&self, worker: &WorkerId) -> Option<&Payee> {
        self.payees.get(worker)
    }

    pub fn is_accrued(&self, task: &TaskId) -> bool {
        self.accruals.contains_key(task) || self.paid_tasks.contains(task)
    }

    /// An accrual not paid yet.
    pub fn accrual(&self, task: &TaskId) -> Option<&Accrual> {
        self.accruals.get(task)
    }

    /// Whether the task's accrual is paid (as far as the books remember: see [`Ledger::observe`]).
    pub fn is_paid(&self, task: &TaskId) -> bool {
        self.paid_tasks.contains(task)
    }

    pub fn settlement(&self, id: &SettlementId) -> Option<&Settlement> {
        self.settlements.get(id)
    }

    /// Settlements that have not ended, oldest first.
    pub fn open_settlements(&self) -> impl Iterator<Item = &Settlement> {
        self.open
            .iter()
            .filter_map(|(_, id)| self.settlements.get(id))
    }

    pub fn anomalies(&self) -> &[String] {
        &self.anomalies
    }

    /// Cheap however long the history: it looks only at unsettled accruals and open settlements.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            accruals: self.accruals.len() + self.paid_tasks.len(),
            accrued: self.accrued,
            paid: self.paid,
            ..Totals::default()
        };
        for a in self
            .unsettled
            .iter()
            .filter_map(|task| self.accruals.get(task))
        {
            match a.state {
                AccrualState::Pending => t.pending += u128::from(a.amount.0),
                AccrualState::Parked { .. } => t.parked += u128::from(a.amount.0),
                _ => {}
            }
        }
        for s in self.open_settlements() {
            let id = s.prepared.settlement_id;
            for task in s.prepared.payouts.iter().flat_map(|p| &p.task_ids) {
                if let Some(a) = self.accruals.get(task)
                    && a.state == AccrualState::InFlight(id)
                {
                    t.in_flight += u128::from(a.amount.0);
                }
            }
        }
        t
    }

    /// Applies one PAYMENTS event; `at` is when it happened (its envelope). Replaying an event is harmless.
    pub fn apply(&mut self, event: &Event, at: Timestamp) {
        match event {
            Event::PaymentAccrued(a) => self.accrue(a, at),
            Event::PayoutParked(p) => {
                for task in &p.task_ids {
                    if let Some(a) = self.accruals.get_mut(task)
                        && a.state == AccrualState::Pending
                    {
                        a.state = AccrualState::Parked {
                            reason: p.reason.clone(),
                        };
                    }
                }
            }
            Event::SettlementPrepared(s) => self.prepare(s, at),
            Event::SettlementSubmitted(s) => {
                if let Some(settlement) = self.settlements.get_mut(&s.settlement_id)
                    && let SettlementStatus::Open { sends } = &mut settlement.status
                {
                    *sends = (*sends).max(s.send_attempt);
                }
            }
            Event::SettlementConfirmed(c) => self.confirm(c, at),
            Event::SettlementExpired(e) => self.end(e.settlement_id, SettlementStatus::Expired),
            Event::SettlementFailed(f) => self.end(
                f.settlement_id,
                SettlementStatus::Failed {
                    reason: f.reason.clone(),
                },
            ),
            _ => {}
        }
    }

    fn accrue(&mut self, a: &PaymentAccrued, at: Timestamp) {
        if self.is_accrued(&a.task_id) {
            return;
        }
        self.accrued += u128::from(a.amount.0);
        self.accruals.insert(
            a.task_id,
            Accrual {
                worker_id: a.worker_id.clone(),
                amount: a.amount,
                accrued_at: at,
                state: AccrualState::Pending,
            },
        );
        self.unsettled.insert(a.task_id);
    }

    fn prepare(&mut self, s: &SettlementPrepared, at: Timestamp) {
        if self.settlements.contains_key(&s.settlement_id) {
            return;
        }
        for payout in &s.payouts {
            for task in &payout.task_ids {
                match self.accruals.get_mut(task) {
                    Some(a) => match &a.state {
                        AccrualState::Pending | AccrualState::Parked { .. } => {
                            a.state = AccrualState::InFlight(s.settlement_id);
                            self.unsettled.remove(task);
                        }
                        AccrualState::InFlight(other) => {
                            self.anomalies.push(format!(
                                "settlement {} carries task {task}, already in settlement {other}",
                                s.settlement_id
                            ));
                        }
                    },
                    None if self.paid_tasks.contains(task) => self.anomalies.push(format!(
                        "settlement {} carries task {task}, already paid",
                        s.settlement_id
                    )),
                    None => self.anomalies.push(format!(
                        "settlement {} carries task {task}, which never accrued",
                        s.settlement_id
                    )),
                }
            }
        }
        self.settlements.insert(
            s.settlement_id,
            Settlement {
                prepared: s.clone(),
                prepared_at: at,
                status: SettlementStatus::Open { sends: 0 },
            },
        );
        self.open.insert((at, s.settlement_id));
    }

    fn confirm(&mut self, c: &SettlementConfirmed, at: Timestamp) {
        let Some(settlement) = self.settlements.get_mut(&c.settlement_id) else {
            self.anomalies.push(format!(
                "settlement {} confirmed but never prepared",
                c.settlement_id
            ));
            return;
        };
        if !settlement.is_open() {
            return;
        }
        self.open.remove(&(settlement.prepared_at, c.settlement_id));
        settlement.status = SettlementStatus::Confirmed {
            failed: c.failed_transfers.clone(),
        };
        for payout in &settlement.prepared.payouts {
            let failed = c
                .failed_transfers
                .iter()
                .any(|f| f.worker_id == payout.worker_id);
            if failed {
                self.retry_at.insert(payout.worker_id.clone(), at);
            } else {
                self.retry_at.remove(&payout.worker_id);
            }
            for task in &payout.task_ids {
                let Some(a) = self.accruals.get_mut(task) else {
                    continue;
                };
                if a.state != AccrualState::InFlight(c.settlement_id) {
                    continue;
                }
                if failed {
                    a.state = AccrualState::Pending;
                    self.unsettled.insert(*task);
                } else {
                    self.paid += u128::from(a.amount.0);
                    self.accruals.remove(task);
                    self.paid_tasks.insert(*task);
                }
            }
        }
        settlement.forget_details();
    }

    /// Ends a settlement that paid nothing: its accruals are pending again.
    fn end(&mut self, id: SettlementId, status: SettlementStatus) {
        let Some(settlement) = self.settlements.get_mut(&id) else {
            return;
        };
        if !settlement.is_open() {
            return;
        }
        self.open.remove(&(settlement.prepared_at, id));
        settlement.status = status;
        for payout in &settlement.prepared.payouts {
            for task in &payout.task_ids {
                if let Some(a) = self.accruals.get_mut(task)
                    && a.state == AccrualState::InFlight(id)
                {
                    a.state = AccrualState::Pending;
                    self.unsettled.insert(*task);
                }
            }
        }
        settlement.forget_details();
    }

    /// What batching would do at `now`: the workers to park (their payable accruals not yet reported) and,
    /// when one is due, the next batch. Nothing is planned while a settlement is open: the wallet's seqno
    /// orders messages, so one goes out at a time.
    pub fn plan(&self, now: Timestamp, policy: &BatchPolicy) -> Plan {
        struct Owed<'a> {
            worker: &'a WorkerId,
            amount: u128,
            oldest: Timestamp,
            /// (accrued at, task, amount), sorted oldest first before use.
            tasks: Vec<(Timestamp, TaskId, u64)>,
        }
        let mut owed: HashMap<&WorkerId, Owed> = HashMap::new();
        let mut park: HashMap<&WorkerId, Owed> = HashMap::new();
        for task in &self.unsettled {
            let Some(a) = self.accruals.get(task) else {
                continue;
            };
            let payable_address = self
                .payees
                .get(&a.worker_id)
                .filter(|_| !self.unpayable.contains_key(&a.worker_id));
            let into = match (&a.state, payable_address) {
                (AccrualState::Pending | AccrualState::Parked { .. }, Some(_)) => &mut owed,
                // Reported once: only pending accruals of an unpayable worker are parked.
                (AccrualState::Pending, None) => &mut park,
                _ => continue,
            };
            let entry = into.entry(&a.worker_id).or_insert(Owed {
                worker: &a.worker_id,
                amount: 0,
                oldest: a.accrued_at,
                tasks: Vec::new(),
            });
            // A transfer is a u64 on the wire: what would overflow it waits for a later batch.
            if entry.amount + u128::from(a.amount.0) > u128::from(u64::MAX) {
                continue;
            }
            entry.amount += u128::from(a.amount.0);
            entry.oldest = entry.oldest.min(a.accrued_at);
            entry.tasks.push((a.accrued_at, *task, a.amount.0));
        }

        let mut plan = Plan::default();
        let mut parked: Vec<Owed> = park.into_values().collect();
        parked.sort_by(|a, b| a.worker.cmp(b.worker));
        for mut p in parked {
            p.tasks.sort();
            let task_ids = p.tasks.iter().map(|t| t.1).collect();
            let destination = self
                .payees
                .get(p.worker)
                .map(|payee| payee.payout_address.clone())
                .unwrap_or_default();
            let reason = match self.unpayable.get(p.worker) {
                Some(reason) => reason.clone(),
                None => "the worker's registration (its payout address) is unknown".to_owned(),
            };
            plan.park.push(PayoutParked {
                worker_id: p.worker.clone(),
                destination,
                amount: Nanoton(u64::try_from(p.amount).unwrap_or(u64::MAX)),
                task_ids,
                reason,
            });
        }

        if !self.open.is_empty() {
            return plan;
        }
        let retry_after = micros(policy.failed_retry_after);
        let mut candidates: Vec<Owed> = owed
            .into_values()
            .filter(|o| o.amount >= u128::from(policy.min_payout.0))
            .filter(|o| {
                self.retry_at
                    .get(o.worker)
                    .is_none_or(|failed_at| now.0 >= failed_at.0.saturating_add(retry_after))
            })
            .collect();
        if candidates.is_empty() {
            return plan;
        }
        let cap = u128::from(policy.max_total.0);
        let all_owed: u128 = candidates.iter().map(|o| o.amount).sum();
        // Only the longest-owed `max_payouts` can go into this batch: select them, then order just those.
        let order = |a: &Owed, b: &Owed| (a.oldest, a.worker).cmp(&(b.oldest, b.worker));
        if candidates.len() > policy.max_payouts {
            candidates.select_nth_unstable_by(policy.max_payouts - 1, order);
            candidates.truncate(policy.max_payouts);
        }
        candidates.sort_by(order);
        let mut chosen: Vec<Owed> = Vec::new();
        let mut total: u128 = 0;
        let mut task_count = 0usize;
        let mut capped = false;
        let mut full = false;
        for o in candidates.iter_mut() {
            if chosen.len() == policy.max_payouts || task_count == policy.max_tasks {
                full = true;
                break;
            }
            if !chosen.is_empty() && total + o.amount > cap {
                capped = true;
                break;
            }
            let mut tasks = std::mem::take(&mut o.tasks);
            let mut amount = o.amount;
            if task_count + tasks.len() > policy.max_tasks {
                // Only the oldest fit; the rest wait for the next batch.
                tasks.sort();
                tasks.truncate(policy.max_tasks - task_count);
                amount = tasks.iter().map(|t| u128::from(t.2)).sum();
                full = true;
                if amount < u128::from(policy.min_payout.0) {
                    break;
                }
            }
            task_count += tasks.len();
            total += amount;
            chosen.push(Owed {
                worker: o.worker,
                amount,
                oldest: o.oldest,
                tasks,
            });
        }
        if chosen.is_empty() {
            return plan;
        }
        let oldest = chosen.iter().map(|o| o.oldest).min().unwrap_or(now);
        let reason = if full || chosen.len() == policy.max_payouts {
            CloseReason::Full
        } else if total >= cap || capped || all_owed >= cap {
            CloseReason::Cap
        } else if now.0.saturating_sub(oldest.0) >= micros(policy.max_age) {
            CloseReason::Age
        } else {
            return plan;
        };
        let payouts = chosen
            .into_iter()
            .map(|mut o| {
                o.tasks.sort_by_key(|t| t.1);
                let payee = &self.payees[o.worker];
                Payout {
                    worker_id: o.worker.clone(),
                    destination: payee.payout_address.clone(),
                    amount: Nanoton(u64::try_from(o.amount).unwrap_or(u64::MAX)),
                    task_ids: o.tasks.into_iter().map(|t| t.1).collect(),
                }
            })
            .collect();
        plan.batch = Some(Batch {
            payouts,
            total: Nanoton(u64::try_from(total).unwrap_or(u64::MAX)),
            reason,
        });
        plan
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::payments::{SettlementExpired, SettlementSubmitted};
    use proptest::prelude::*;
    use tonlib_core::TonAddress;

    const SECOND: i64 = 1_000_000;

    fn worker(i: usize) -> WorkerId {
        WorkerId::new(format!("w{i}")).unwrap()
    }

    fn address(i: usize) -> String {
        TonAddress::new(0, [i as u8 + 1; 32].into()).to_base64_url()
    }

    fn policy() -> BatchPolicy {
        BatchPolicy {
            max_payouts: 255,
            max_age: Duration::from_secs(30),
            max_total: Nanoton(1_000_000),
            min_payout: Nanoton(100),
            failed_retry_after: Duration::from_secs(60),
            max_tasks: 1_000,
        }
    }

    fn ledger(workers: usize) -> Ledger {
        let mut l = Ledger::new();
        for i in 0..workers {
            l.register(
                worker(i),
                Payee {
                    payout_address: address(i),
                    price_per_gpu_second: Nanoton(1_000),
                },
            );
        }
        l
    }

    fn accrue(l: &mut Ledger, w: usize, amount: u64, at: i64) -> TaskId {
        let task = TaskId::new();
        accrue_task(l, task, w, amount, at);
        task
    }

    fn prepare(l: &mut Ledger, batch: &Batch, at: i64) -> SettlementId {
        let id = SettlementId::new();
        l.apply(
            &Event::SettlementPrepared(SettlementPrepared {
                settlement_id: id,
                wallet_seqno: 0,
                valid_until: Timestamp(at + 60 * SECOND),
                payouts: batch.payouts.clone(),
                signed_message: vec![1],
                message_hash: "00".into(),
            }),
            Timestamp(at),
        );
        id
    }

    fn confirm(l: &mut Ledger, id: SettlementId, failed: &[WorkerId], at: i64) {
        l.apply(
            &Event::SettlementConfirmed(SettlementConfirmed {
                settlement_id: id,
                tx_hash: "aa".into(),
                logical_time: 1,
                failed_transfers: failed
                    .iter()
                    .map(|w| FailedTransfer {
                        worker_id: w.clone(),
                        reason: "no balance".into(),
                    })
                    .collect(),
            }),
            Timestamp(at),
        );
    }

    fn conserved(l: &Ledger) {
        let t = l.totals();
        assert_eq!(
            t.accrued,
            t.pending + t.parked + t.in_flight + t.paid,
            "{t:?}"
        );
    }

    #[test]
    fn a_task_accrues_once() {
        let mut l = ledger(1);
        let task = accrue(&mut l, 0, 500, 0);
        let again = PaymentAccrued {
            task_id: task,
            worker_id: worker(0),
            attempt: 2,
            gpu_millis: events::money::GpuMillis(9),
            price_per_gpu_second: Nanoton(1),
            amount: Nanoton(9_999),
        };
        l.apply(&Event::PaymentAccrued(again), Timestamp(5));
        assert_eq!(l.totals().accrued, 500);
        assert_eq!(l.totals().accruals, 1);
    }

    /// A v7 task id minted at `at` (µs).
    fn task_minted_at(at: i64) -> TaskId {
        let millis = u128::try_from(at / 1_000).unwrap();
        TaskId::from_u128(millis << 80 | 0x7000_8000_0000_0000_0000 | u128::from(rand_bits()))
    }

    fn rand_bits() -> u32 {
        TaskId::new().as_uuid().as_u128() as u32
    }

    fn accrue_task(l: &mut Ledger, task: TaskId, w: usize, amount: u64, at: i64) {
        l.apply(
            &Event::PaymentAccrued(PaymentAccrued {
                task_id: task,
                worker_id: worker(w),
                attempt: 1,
                gpu_millis: events::money::GpuMillis(amount),
                price_per_gpu_second: Nanoton(1_000),
                amount: Nanoton(amount),
            }),
            Timestamp(at),
        );
    }

    #[test]
    fn paid_ids_are_forgotten_only_once_their_tasks_can_no_longer_accrue() {
        const HOUR: i64 = 3_600 * SECOND;
        let mut l = ledger(1);
        l = Ledger {
            window: Duration::from_secs(3_600),
            ..l
        };
        // Now, as the settlement prepared below is minted now.
        let t0 = Timestamp::now().0;
        let old = task_minted_at(t0);
        let young = task_minted_at(t0 + HOUR / 2);
        l.observe(Timestamp(t0 + HOUR / 2));
        assert_eq!(l.admits(&old), Ok(()));
        accrue_task(&mut l, old, 0, 500, t0 + HOUR / 2);
        accrue_task(&mut l, young, 0, 700, t0 + HOUR / 2);
        let batch = l.plan(Timestamp(t0 + HOUR), &policy()).batch.unwrap();
        let id = prepare(&mut l, &batch, t0 + HOUR);
        confirm(&mut l, id, &[], t0 + HOUR);
        assert!(l.is_paid(&old) && l.is_paid(&young));
        assert_eq!(l.paid_remembered(), 2);

        // Log time passes the old task's window: its id is forgotten, and a completion of it is refused.
        l.observe(Timestamp(t0 + HOUR + 2 * SECOND));
        assert!(!l.is_paid(&old) && !l.is_accrued(&old));
        assert!(matches!(l.admits(&old), Err(Inadmissible::TooOld { .. })));
        assert!(l.is_paid(&young) && l.admits(&young).is_ok());
        assert_eq!(l.paid_remembered(), 1);
        // A log time from the past (a replay of TASKS) does not move the horizon back.
        l.observe(Timestamp(t0));
        assert!(l.admits(&old).is_err());
        assert_eq!(l.totals().paid, 1_200, "what was paid stays counted");

        // An id that is not a UUIDv7 has no age, so it never accrues.
        assert_eq!(
            l.admits(&TaskId::from_u128(7)),
            Err(Inadmissible::NotTimeOrdered)
        );
        // Unpaid accruals are kept whatever their age: they are still owed.
        let owed = task_minted_at(t0 + HOUR + SECOND);
        accrue_task(&mut l, owed, 0, 900, t0 + HOUR + 3 * SECOND);
        l.observe(Timestamp(t0 + 10 * HOUR));
        assert!(l.is_accrued(&owed) && !l.is_paid(&owed));
        assert_eq!(l.totals().pending, 900);
        assert_eq!(l.paid_remembered(), 0);
        assert!(
            l.settlement(&id).is_none(),
            "an ended settlement is forgotten too"
        );
        conserved(&l);
    }

    #[test]
    fn a_batch_closes_by_age_and_sums_per_worker() {
        let mut l = ledger(2);
        accrue(&mut l, 0, 300, 0);
        accrue(&mut l, 0, 200, 10 * SECOND);
        accrue(&mut l, 1, 400, 20 * SECOND);
        assert_eq!(l.plan(Timestamp(29 * SECOND), &policy()).batch, None);
        let batch = l.plan(Timestamp(30 * SECOND), &policy()).batch.unwrap();
        assert_eq!(batch.reason, CloseReason::Age);
        assert_eq!(batch.total, Nanoton(900));
        assert_eq!(batch.payouts.len(), 2);
        assert_eq!(batch.payouts[0].worker_id, worker(0), "oldest owed first");
        assert_eq!(batch.payouts[0].amount, Nanoton(500));
        assert_eq!(batch.payouts[0].task_ids.len(), 2);
        assert_eq!(batch.payouts[0].destination, address(0));
    }

    #[test]
    fn a_batch_closes_when_full_and_the_rest_waits() {
        let mut l = ledger(5);
        for w in 0..5 {
            accrue(&mut l, w, 100 + w as u64, w as i64);
        }
        let p = BatchPolicy {
            max_payouts: 3,
            ..policy()
        };
        let batch = l.plan(Timestamp(1), &p).batch.unwrap();
        assert_eq!(batch.reason, CloseReason::Full);
        let ids: Vec<_> = batch.payouts.iter().map(|p| p.worker_id.clone()).collect();
        assert_eq!(ids, vec![worker(0), worker(1), worker(2)]);
        let id = prepare(&mut l, &batch, 2);
        assert_eq!(
            l.plan(Timestamp(3), &p).batch,
            None,
            "one settlement at a time"
        );
        confirm(&mut l, id, &[], 4);
        conserved(&l);
        assert_eq!(l.totals().paid, 303);
        // The other two are not a full batch: they wait for their age.
        assert_eq!(l.plan(Timestamp(5), &p).batch, None);
        let rest = l.plan(Timestamp(31 * SECOND), &p).batch.unwrap();
        assert_eq!(rest.payouts.len(), 2);
    }

    #[test]
    fn a_batch_closes_at_its_cap_without_passing_it() {
        let mut l = ledger(3);
        accrue(&mut l, 0, 600_000, 0);
        accrue(&mut l, 1, 300_000, 1);
        accrue(&mut l, 2, 200_000, 2);
        let batch = l.plan(Timestamp(3), &policy()).batch.unwrap();
        assert_eq!(batch.reason, CloseReason::Cap);
        assert_eq!(batch.total, Nanoton(900_000));
        assert_eq!(batch.payouts.len(), 2);
    }

    #[test]
    fn amounts_below_the_minimum_carry_over() {
        let mut l = ledger(2);
        accrue(&mut l, 0, 60, 0);
        accrue(&mut l, 1, 500, 0);
        let batch = l.plan(Timestamp(40 * SECOND), &policy()).batch.unwrap();
        assert_eq!(batch.payouts.len(), 1);
        assert_eq!(batch.payouts[0].worker_id, worker(1));
        let id = prepare(&mut l, &batch, 41 * SECOND);
        confirm(&mut l, id, &[], 42 * SECOND);
        assert_eq!(l.plan(Timestamp(100 * SECOND), &policy()).batch, None);
        accrue(&mut l, 0, 40, 101 * SECOND);
        let batch = l.plan(Timestamp(102 * SECOND), &policy()).batch.unwrap();
        assert_eq!(
            batch.payouts[0].amount,
            Nanoton(100),
            "carried over and summed"
        );
        conserved(&l);
    }

    #[test]
    fn an_unpayable_address_is_parked_once_and_released_by_a_new_registration() {
        let mut l = ledger(2);
        l.register(
            worker(1),
            Payee {
                payout_address: "not an address".into(),
                price_per_gpu_second: Nanoton(1),
            },
        );
        accrue(&mut l, 0, 500, 0);
        let parked_task = accrue(&mut l, 1, 700, 0);
        let plan = l.plan(Timestamp(31 * SECOND), &policy());
        assert_eq!(plan.park.len(), 1);
        assert_eq!(plan.park[0].worker_id, worker(1));
        assert_eq!(plan.park[0].task_ids, vec![parked_task]);
        assert!(
            plan.park[0].reason.contains("not a TON address"),
            "{:?}",
            plan.park[0].reason
        );
        let batch = plan.batch.unwrap();
        assert_eq!(batch.payouts.len(), 1, "the rest of the batch goes on");
        for p in plan.park {
            l.apply(&Event::PayoutParked(p), Timestamp(31 * SECOND));
        }
        assert_eq!(l.totals().parked, 700);
        assert!(
            l.plan(Timestamp(32 * SECOND), &policy()).park.is_empty(),
            "reported once"
        );
        let id = prepare(&mut l, &batch, 32 * SECOND);
        confirm(&mut l, id, &[], 33 * SECOND);
        l.register(
            worker(1),
            Payee {
                payout_address: address(1),
                price_per_gpu_second: Nanoton(1),
            },
        );
        let batch = l.plan(Timestamp(34 * SECOND), &policy()).batch.unwrap();
        assert_eq!(batch.payouts[0].worker_id, worker(1));
        assert_eq!(batch.payouts[0].amount, Nanoton(700));
        conserved(&l);
    }

    #[test]
    fn a_failed_transfer_stays_unpaid_and_is_retried_later() {
        let mut l = ledger(2);
        accrue(&mut l, 0, 500, 0);
        accrue(&mut l, 1, 700, 0);
        let batch = l.plan(Timestamp(31 * SECOND), &policy()).batch.unwrap();
        let id = prepare(&mut l, &batch, 31 * SECOND);
        assert_eq!(l.totals().in_flight, 1_200);
        confirm(&mut l, id, &[worker(1)], 32 * SECOND);
        let t = l.totals();
        assert_eq!((t.paid, t.pending), (500, 700));
        assert_eq!(
            l.plan(Timestamp(60 * SECOND), &policy()).batch,
            None,
            "not before the retry delay"
        );
        let retry = l.plan(Timestamp(92 * SECOND), &policy()).batch.unwrap();
        assert_eq!(retry.payouts.len(), 1);
        assert_eq!(retry.payouts[0].worker_id, worker(1));
        conserved(&l);
    }

    #[test]
    fn an_expired_settlement_releases_its_accruals_into_a_new_batch() {
        let mut l = ledger(1);
        let task = accrue(&mut l, 0, 500, 0);
        let batch = l.plan(Timestamp(31 * SECOND), &policy()).batch.unwrap();
        let first = prepare(&mut l, &batch, 31 * SECOND);
        l.apply(
            &Event::SettlementSubmitted(SettlementSubmitted {
                settlement_id: first,
                message_hash: "00".into(),
                send_attempt: 3,
            }),
            Timestamp(32 * SECOND),
        );
        assert_eq!(
            l.settlement(&first).unwrap().status,
            SettlementStatus::Open { sends: 3 }
        );
        l.apply(
            &Event::SettlementExpired(SettlementExpired {
                settlement_id: first,
                valid_until: Timestamp(91 * SECOND),
            }),
            Timestamp(97 * SECOND),
        );
        // A late confirmation of the expired settlement changes nothing.
        confirm(&mut l, first, &[], 98 * SECOND);
        assert_eq!(l.totals().paid, 0);
        let again = l.plan(Timestamp(99 * SECOND), &policy()).batch.unwrap();
        assert_eq!(again.payouts[0].task_ids, vec![task]);
        let second = prepare(&mut l, &again, 99 * SECOND);
        confirm(&mut l, second, &[], 100 * SECOND);
        assert_eq!(l.totals().paid, 500);
        assert!(l.is_paid(&task));
        assert_eq!(
            l.accrual(&task),
            None,
            "a paid accrual keeps only its task id"
        );
        assert!(l.settlement(&second).unwrap().prepared.payouts.is_empty());
        assert!(l.anomalies().is_empty());
    }

    #[test]
    fn a_second_settlement_carrying_a_paid_task_is_an_anomaly_and_pays_nothing_more() {
        let mut l = ledger(1);
        accrue(&mut l, 0, 500, 0);
        let batch = l.plan(Timestamp(31 * SECOND), &policy()).batch.unwrap();
        let first = prepare(&mut l, &batch, 31 * SECOND);
        confirm(&mut l, first, &[], 32 * SECOND);
        let dup = prepare(&mut l, &batch, 33 * SECOND);
        confirm(&mut l, dup, &[], 34 * SECOND);
        assert_eq!(l.totals().paid, 500);
        assert_eq!(l.anomalies().len(), 1, "{:?}", l.anomalies());
    }

    #[test]
    fn the_task_limit_splits_a_large_worker_over_batches() {
        let mut l = ledger(1);
        for i in 0..5 {
            accrue(&mut l, 0, 100, i);
        }
        let p = BatchPolicy {
            max_tasks: 3,
            ..policy()
        };
        let batch = l.plan(Timestamp(10), &p).batch.unwrap();
        assert_eq!(batch.reason, CloseReason::Full);
        assert_eq!(batch.payouts[0].task_ids.len(), 3);
        assert_eq!(batch.payouts[0].amount, Nanoton(300));
        let id = prepare(&mut l, &batch, 11);
        confirm(&mut l, id, &[], 12);
        assert_eq!(l.totals().pending, 200);
        conserved(&l);
    }

    #[test]
    fn policies_are_validated() {
        assert!(policy().validate().is_ok());
        for bad in [
            BatchPolicy {
                max_payouts: 0,
                ..policy()
            },
            BatchPolicy {
                max_payouts: 256,
                ..policy()
            },
            BatchPolicy {
                min_payout: Nanoton(0),
                ..policy()
            },
            BatchPolicy {
                max_total: Nanoton(1),
                ..policy()
            },
            BatchPolicy {
                max_tasks: 0,
                ..policy()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Accrue { worker: usize, amount: u64 },
        Duplicate(usize),
        Settle,
        Confirm { fail_mask: u8 },
        Expire,
        Wait(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6usize, 1..500u64).prop_map(|(worker, amount)| Op::Accrue { worker, amount }),
            1 => (0..64usize).prop_map(Op::Duplicate),
            2 => Just(Op::Settle),
            2 => any::<u8>().prop_map(|fail_mask| Op::Confirm { fail_mask }),
            1 => Just(Op::Expire),
            2 => (1..100i64).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Whatever happens, in whatever order: no task is paid twice, and every nanoton accrued is pending,
        /// parked, in flight or paid.
        #[test]
        fn no_task_is_paid_twice_and_nothing_is_lost(ops in proptest::collection::vec(op(), 1..80)) {
            let mut l = ledger(6);
            let p = BatchPolicy { max_payouts: 4, ..policy() };
            let mut now = 0i64;
            let mut tasks: Vec<(TaskId, usize, u64)> = Vec::new();
            let mut open: Option<SettlementId> = None;
            let mut paid_by: HashMap<TaskId, SettlementId> = HashMap::new();
            for op in ops {
                now += SECOND;
                match op {
                    Op::Accrue { worker, amount } => {
                        let t = accrue(&mut l, worker, amount, now);
                        tasks.push((t, worker, amount));
                    }
                    Op::Duplicate(i) => {
                        if let Some((t, w, a)) = tasks.get(i % tasks.len().max(1)).cloned() {
                            l.apply(&Event::PaymentAccrued(PaymentAccrued {
                                task_id: t, worker_id: worker(w), attempt: 2,
                                gpu_millis: events::money::GpuMillis(a),
                                price_per_gpu_second: Nanoton(1), amount: Nanoton(a + 1),
                            }), Timestamp(now));
                        }
                    }
                    Op::Settle => {
                        if let Some(batch) = l.plan(Timestamp(now), &p).batch {
                            prop_assert!(open.is_none());
                            prop_assert!(batch.payouts.len() <= 4);
                            open = Some(prepare(&mut l, &batch, now));
                        }
                    }
                    Op::Confirm { fail_mask } => {
                        if let Some(id) = open.take() {
                            let payouts = l.settlement(&id).unwrap().prepared.payouts.clone();
                            let failed: Vec<WorkerId> = payouts.iter().enumerate()
                                .filter(|(i, _)| fail_mask & (1 << i) != 0)
                                .map(|(_, p)| p.worker_id.clone()).collect();
                            confirm(&mut l, id, &failed, now);
                            for payout in payouts.iter().filter(|p| !failed.contains(&p.worker_id)) {
                                for t in &payout.task_ids {
                                    prop_assert!(paid_by.insert(*t, id).is_none(), "task {} paid twice", t);
                                }
                            }
                        }
                    }
                    Op::Expire => {
                        if let Some(id) = open.take() {
                            l.apply(&Event::SettlementExpired(SettlementExpired {
                                settlement_id: id, valid_until: Timestamp(now),
                            }), Timestamp(now));
                        }
                    }
                    Op::Wait(s) => now += s * SECOND,
                }
                conserved(&l);
                prop_assert!(l.anomalies().is_empty(), "{:?}", l.anomalies());
            }
            let accrued: u64 = tasks.iter().map(|t| t.2).sum();
            prop_assert_eq!(l.totals().accrued, u128::from(accrued));
            let paid: u64 = tasks.iter().filter(|t| paid_by.contains_key(&t.0)).map(|t| t.2).sum();
            prop_assert_eq!(l.totals().paid, u128::from(paid));
        }
    }
}
