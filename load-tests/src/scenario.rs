//! Scenario files of the whole-system load test (`load-tests/scenarios/*.toml`): the fleet, the offered
//! rate, the task mix and the services' knobs, and the seeded streams made from them (the fleet and the
//! tasks), so that a scenario and its seed give the same workload every run.
//!
//! Only the workload is reproducible: task ids are fresh UUIDv7s minted by the producer, and what the pool
//! does with the tasks depends on timing.

use std::path::Path;

use serde::Deserialize;

/// Why a scenario cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid scenario: {message}")]
    Parse { path: String, message: String },
    #[error("scenario {name}: {problem}")]
    Invalid { name: String, problem: String },
}

/// A scenario file. Every table is `deny_unknown_fields`, so a misspelt knob is an error, not a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Names the report directory (`<name>-<date>`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeds the fleet and the task stream.
    pub seed: u64,
    /// Seconds of offered load (the ramp included).
    pub duration_s: u64,
    /// Tasks per second offered once the ramp is over.
    pub rate: u32,
    /// Seconds over which the rate climbs linearly from 0 to `rate`.
    #[serde(default)]
    pub ramp_s: u64,
    /// After the load: how long every task may take to be completed, projected and paid.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// Client ids `load-0 .. load-<clients-1>`, used in turn: each has its own result subject.
    #[serde(default = "default_clients")]
    pub clients: u32,
    pub workers: Workers,
    /// The task mix: each task picks a class by weight.
    pub tasks: Vec<TaskClass>,
    #[serde(default)]
    pub allocator: AllocatorKnobs,
    #[serde(default)]
    pub settler: SettlerKnobs,
    #[serde(default)]
    pub projector: ProjectorKnobs,
}

fn default_drain_timeout_s() -> u64 {
    300
}

fn default_clients() -> u32 {
    4
}

/// The simulated fleet.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workers {
    pub count: u32,
    /// Worker kinds, picked by weight.
    pub mix: Vec<WorkerKind>,
    /// Nanoton per GPU-second, drawn uniformly per worker from `[min, max]`.
    pub price_per_gpu_second: [u64; 2],
    pub heartbeat_interval_ms: u64,
    /// Model tags; a worker serves one of them with probability `tagged_share`.
    #[serde(default)]
    pub model_tags: Vec<String>,
    #[serde(default)]
    pub tagged_share: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerKind {
    pub weight: u32,
    pub gpus: u32,
    /// Attempts a worker of this kind runs at once; default: its GPU count.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

/// One class of the task mix.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskClass {
    pub name: String,
    pub weight: u32,
    /// Drawn uniformly from `[min, max]` (1..=10).
    pub priority: [u8; 2],
    pub gpus: u16,
    /// Per GPU; 0: any.
    #[serde(default)]
    pub gpu_memory_mib: u64,
    /// How long the simulated executor runs an attempt, drawn uniformly from `[min, max]`.
    pub duration_ms: [u64; 2],
    pub max_price_per_gpu_second: u64,
    #[serde(default)]
    pub model_tag: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Size of the task's input (and of its echoed result), at least what the header needs.
    #[serde(default = "default_input_bytes")]
    pub input_bytes: usize,
}

fn default_timeout_ms() -> u64 {
    60_000
}

fn default_input_bytes() -> usize {
    64
}

/// The allocator's command-line knobs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocatorKnobs {
    pub heartbeat_timeout_ms: u64,
    /// How long (of log time) the allocator remembers a finished task (`--finished-retention-s`).
    pub finished_retention_s: u64,
}

impl Default for AllocatorKnobs {
    fn default() -> Self {
        Self {
            heartbeat_timeout_ms: 10_000,
            finished_retention_s: 600,
        }
    }
}

/// The settler's command-line knobs (the defaults pay every amount quickly on the local chain, as `dev pool`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlerKnobs {
    pub max_age_s: u64,
    pub min_payout_nanoton: u64,
    pub resend_interval_ms: u64,
    pub check_interval_ms: u64,
    /// How long after its submission a task may accrue; paid task ids older are forgotten
    /// (`--accrual-window-s`).
    pub accrual_window_s: u64,
    /// The pool wallet's balance on the local chain at start, in TON.
    pub wallet_ton: u64,
}

impl Default for SettlerKnobs {
    fn default() -> Self {
        Self {
            max_age_s: 2,
            min_payout_nanoton: 1,
            resend_interval_ms: 1_000,
            check_interval_ms: 1_000,
            accrual_window_s: 604_800,
            wallet_ton: 1_000_000,
        }
    }
}

/// The projector's command-line knobs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorKnobs {
    pub workers: u32,
}

impl Default for ProjectorKnobs {
    fn default() -> Self {
        Self { workers: 2 }
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: shown.clone(),
            source,
        })?;
        Scenario::parse(&text, &shown)
    }

    /// Parses and validates scenario text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks what serde cannot: ranges, weights, and that every task class fits some worker.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |problem: String| {
            Err(ScenarioError::Invalid {
                name: self.name.clone(),
                problem,
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "name {:?} must be non-empty ASCII letters, digits, - or _ (it names a directory)",
                self.name
            ));
        }
        if self.duration_s == 0 || self.rate == 0 {
            return bad("duration_s and rate must be greater than 0".into());
        }
        if self.ramp_s > self.duration_s {
            return bad(format!(
                "ramp_s {} is longer than duration_s {}",
                self.ramp_s, self.duration_s
            ));
        }
        if self.clients == 0 {
            return bad("clients must be at least 1".into());
        }
        let w = &self.workers;
        if w.count == 0 || w.count > 1_000_000 {
            return bad(format!("workers.count {} is outside 1..=1000000", w.count));
        }
        if w.mix.is_empty() || w.mix.iter().all(|k| k.weight == 0) {
            return bad("workers.mix needs at least one kind with a weight".into());
        }
        for k in &w.mix {
            if k.gpus == 0 || k.gpus > 64 {
                return bad(format!("a worker kind has {} GPUs (1..=64)", k.gpus));
            }
            if k.max_concurrent == Some(0) {
                return bad("workers.mix max_concurrent must be at least 1".into());
            }
        }
        if w.price_per_gpu_second[0] > w.price_per_gpu_second[1] {
            return bad("workers.price_per_gpu_second is [min, max] with min <= max".into());
        }
        if w.heartbeat_interval_ms < 100 {
            return bad("workers.heartbeat_interval_ms must be at least 100".into());
        }
        if !(0.0..=1.0).contains(&w.tagged_share) {
            return bad("workers.tagged_share must lie in 0..=1".into());
        }
        if w.tagged_share > 0.0 && w.model_tags.is_empty() {
            return bad("workers.tagged_share needs workers.model_tags".into());
        }
        if self.tasks.is_empty() || self.tasks.iter().all(|t| t.weight == 0) {
            return bad("the task mix needs at least one class with a weight".into());
        }
        let most_gpus = w
            .mix
            .iter()
            .filter(|k| k.weight > 0)
            .map(|k| k.gpus)
            .max()
            .unwrap_or(0);
        for t in &self.tasks {
            let [pmin, pmax] = t.priority;
            if pmin == 0 || pmax > 10 || pmin > pmax {
                return bad(format!(
                    "task class {}: priority is [min, max] within 1..=10",
                    t.name
                ));
            }
            if t.gpus == 0 || u32::from(t.gpus) > most_gpus {
                return bad(format!(
                    "task class {}: {} GPUs, but workers have at most {most_gpus}",
                    t.name, t.gpus
                ));
            }
            if t.duration_ms[0] > t.duration_ms[1] {
                return bad(format!("task class {}: duration_ms is [min, max]", t.name));
            }
            if t.duration_ms[1] >= t.timeout_ms {
                return bad(format!(
                    "task class {}: the longest duration {} ms does not finish within timeout_ms {}",
                    t.name, t.duration_ms[1], t.timeout_ms
                ));
            }
            if t.max_price_per_gpu_second < w.price_per_gpu_second[1] {
                return bad(format!(
                    "task class {}: max_price_per_gpu_second {} is below the dearest worker ({}), so some \
                     workers could never take it",
                    t.name, t.max_price_per_gpu_second, w.price_per_gpu_second[1]
                ));
            }
            if let Some(tag) = &t.model_tag
                && !w.model_tags.contains(tag)
            {
                return bad(format!(
                    "task class {}: model tag {tag:?} is served by no worker",
                    t.name
                ));
            }
            if t.input_bytes < MIN_INPUT_BYTES || t.input_bytes > 64 * 1024 {
                return bad(format!(
                    "task class {}: input_bytes must lie in {MIN_INPUT_BYTES}..=65536",
                    t.name
                ));
            }
        }
        Ok(())
    }

    /// Tasks offered in the first `t` seconds: a linear ramp to `rate` over `ramp_s`, then `rate`; never more
    /// than [`Scenario::total_tasks`].
    pub fn due(&self, t: f64) -> u64 {
        let rate = f64::from(self.rate);
        let ramp = self.ramp_s as f64;
        let t = t.clamp(0.0, self.duration_s as f64);
        let offered = if t < ramp {
            rate * t * t / (2.0 * ramp)
        } else {
            rate * ramp / 2.0 + rate * (t - ramp)
        };
        (offered.floor() as u64).min(self.total_tasks())
    }

    /// Every task the scenario submits.
    pub fn total_tasks(&self) -> u64 {
        let rate = f64::from(self.rate);
        (rate * self.ramp_s as f64 / 2.0 + rate * (self.duration_s - self.ramp_s) as f64).floor()
            as u64
    }

    /// The fleet: one plan per worker, in id order.
    pub fn fleet(&self) -> Vec<WorkerPlan> {
        let mut rng = Rng::new(self.seed ^ FLEET_STREAM);
        let w = &self.workers;
        let weights: Vec<u32> = w.mix.iter().map(|k| k.weight).collect();
        let width = w.count.to_string().len().max(5);
        (0..w.count)
            .map(|i| {
                let kind = &w.mix[rng.weighted(&weights)];
                let price = rng.range(w.price_per_gpu_second[0], w.price_per_gpu_second[1]);
                let tagged = !w.model_tags.is_empty() && rng.unit() < w.tagged_share;
                let model_tags = if tagged {
                    let t = rng.range(0, w.model_tags.len() as u64 - 1) as usize;
                    vec![w.model_tags[t].clone()]
                } else {
                    Vec::new()
                };
                WorkerPlan {
                    id: format!("sim-{i:0width$}"),
                    gpus: kind.gpus,
                    max_concurrent: kind.max_concurrent.unwrap_or(kind.gpus),
                    price_per_gpu_second: price,
                    model_tags,
                }
            })
            .collect()
    }

    /// The task stream, from its first task.
    pub fn tasks(&self) -> TaskStream<'_> {
        TaskStream {
            scenario: self,
            rng: Rng::new(self.seed ^ TASK_STREAM),
            weights: self.tasks.iter().map(|t| t.weight).collect(),
            next_index: 0,
        }
    }
}

/// Separate streams of the seed, so that changing the fleet does not change the tasks.
const FLEET_STREAM: u64 = 0x666c_6565_7400_0000;
const TASK_STREAM: u64 = 0x7461_736b_7300_0000;

/// One simulated worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    pub id: String,
    pub gpus: u32,
    pub max_concurrent: u32,
    pub price_per_gpu_second: u64,
    pub model_tags: Vec<String>,
}

/// One task of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTask {
    /// Position in the stream, from 0.
    pub index: u64,
    /// Index into the scenario's task classes.
    pub class: usize,
    pub client: u32,
    pub priority: u8,
    pub gpus: u16,
    pub gpu_memory_mib: u64,
    pub duration_ms: u64,
    pub max_price_per_gpu_second: u64,
    pub model_tag: Option<String>,
    pub timeout_ms: u64,
    /// The input: [`input_header`] padded to the class's `input_bytes`.
    pub input: Vec<u8>,
}

/// The seeded, endless stream of tasks; a given seed gives the same tasks in the same order.
#[derive(Debug, Clone)]
pub struct TaskStream<'a> {
    scenario: &'a Scenario,
    rng: Rng,
    weights: Vec<u32>,
    next_index: u64,
}

impl Iterator for TaskStream<'_> {
    type Item = PlannedTask;

    fn next(&mut self) -> Option<PlannedTask> {
        let index = self.next_index;
        self.next_index += 1;
        let class = self.rng.weighted(&self.weights);
        let c = &self.scenario.tasks[class];
        let priority = self
            .rng
            .range(u64::from(c.priority[0]), u64::from(c.priority[1])) as u8;
        let duration_ms = self.rng.range(c.duration_ms[0], c.duration_ms[1]);
        let mut input = input_header(index, duration_ms).into_bytes();
        // Padding after the header: the result echoes the input, so this sizes both events.
        input.resize(c.input_bytes.max(input.len()), b'.');
        Some(PlannedTask {
            index,
            class,
            client: (index % u64::from(self.scenario.clients)) as u32,
            priority,
            gpus: c.gpus,
            gpu_memory_mib: c.gpu_memory_mib,
            duration_ms,
            max_price_per_gpu_second: c.max_price_per_gpu_second,
            model_tag: c.model_tag.clone(),
            timeout_ms: c.timeout_ms,
            input,
        })
    }
}

/// Inputs are at least this long: room for the header of any task (at most 52 bytes).
pub const MIN_INPUT_BYTES: usize = 64;

/// The start of a task's input: its index in the stream and how long the simulated executor runs it, which
/// the fleet reads back from the allocation (the task carries its own duration, as a real task carries its
/// work).
pub fn input_header(index: u64, duration_ms: u64) -> String {
    format!("load n={index} ms={duration_ms};")
}

/// The simulated duration written by [`input_header`]; `None` when the input does not carry one.
pub fn simulated_duration_ms(input: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(input.get(..input.len().min(MIN_INPUT_BYTES))?).ok()?;
    let rest = text.strip_prefix("load n=")?;
    let (_, rest) = rest.split_once(" ms=")?;
    let (ms, _) = rest.split_once(';')?;
    ms.parse().ok()
}

/// SplitMix64: small, fast, and the same on every platform, which is all a workload generator needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]` (inclusive; `lo` when `hi <= lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo + 1;
        // The modulo bias is below 2^-40 for the spans used here.
        lo + self.next_u64() % span
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index picked with probability proportional to its weight (the weights are not all zero).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut pick = self.range(0, total.saturating_sub(1));
        for (i, &w) in weights.iter().enumerate() {
            if pick < u64::from(w) {
                return i;
            }
            pick -= u64::from(w);
        }
        weights.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenarios_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
    }

    #[test]
    fn every_shipped_scenario_loads() {
        let mut seen = 0;
        for entry in std::fs::read_dir(scenarios_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    path.file_stem().unwrap().to_str().unwrap(),
                    s.name,
                    "the file is named after its scenario"
                );
                seen += 1;
            }
        }
        assert!(seen >= 2, "smoke.toml and full.toml at least");
    }

    #[test]
    fn full_is_the_acceptance_scenario() {
        let s = Scenario::load(&scenarios_dir().join("full.toml")).unwrap();
        assert_eq!(s.workers.count, 10_000);
        assert_eq!(s.rate, 2_000);
        // Five minutes at the full rate after the ramp.
        assert_eq!(s.duration_s - s.ramp_s, 300);
    }

    fn small() -> Scenario {
        Scenario::parse(
            r#"
            name = "t"
            seed = 7
            duration_s = 10
            rate = 100
            ramp_s = 4
            [workers]
            count = 50
            price_per_gpu_second = [1000, 2000]
            heartbeat_interval_ms = 1000
            model_tags = ["m"]
            tagged_share = 0.5
            mix = [{ weight = 1, gpus = 1 }, { weight = 1, gpus = 4, max_concurrent = 2 }]
            [[tasks]]
            name = "a"
            weight = 3
            priority = [1, 10]
            gpus = 1
            duration_ms = [10, 100]
            max_price_per_gpu_second = 3000
            [[tasks]]
            name = "b"
            weight = 1
            priority = [5, 5]
            gpus = 4
            duration_ms = [0, 0]
            max_price_per_gpu_second = 3000
            model_tag = "m"
            input_bytes = 100
            "#,
            "inline",
        )
        .unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let s = small();
        let a: Vec<_> = s.tasks().take(500).collect();
        let b: Vec<_> = s.tasks().take(500).collect();
        assert_eq!(a, b);
        assert_eq!(s.fleet(), s.fleet());
        let mut other = s.clone();
        other.seed = 8;
        let c: Vec<_> = other.tasks().take(500).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn tasks_follow_their_class() {
        let s = small();
        let tasks: Vec<_> = s.tasks().take(2_000).collect();
        let b = tasks.iter().filter(|t| t.class == 1).count();
        // Weight 1 of 4.
        assert!((350..650).contains(&b), "{b} of 2000 in class b");
        for t in &tasks {
            let c = &s.tasks[t.class];
            assert!((c.priority[0]..=c.priority[1]).contains(&t.priority));
            assert!((c.duration_ms[0]..=c.duration_ms[1]).contains(&t.duration_ms));
            assert_eq!(t.gpus, c.gpus);
            assert_eq!(t.input.len(), c.input_bytes);
            assert_eq!(simulated_duration_ms(&t.input), Some(t.duration_ms));
            assert_eq!(t.client, (t.index % 4) as u32);
        }
    }

    #[test]
    fn the_fleet_follows_the_mix() {
        let s = small();
        let fleet = s.fleet();
        assert_eq!(fleet.len(), 50);
        assert_eq!(fleet[7].id, "sim-00007");
        for w in &fleet {
            assert!(w.gpus == 1 || (w.gpus == 4 && w.max_concurrent == 2));
            assert!((1000..=2000).contains(&w.price_per_gpu_second));
        }
        let tagged = fleet.iter().filter(|w| !w.model_tags.is_empty()).count();
        assert!((10..40).contains(&tagged), "{tagged} of 50 tagged");
    }

    #[test]
    fn the_rate_ramps_then_holds() {
        let s = small();
        assert_eq!(s.due(0.0), 0);
        // Half way up the ramp: 100 × 2² / 8 = 50.
        assert_eq!(s.due(2.0), 50);
        // End of the ramp: 200; then 100 a second.
        assert_eq!(s.due(4.0), 200);
        assert_eq!(s.due(5.0), 300);
        assert_eq!(s.total_tasks(), 800);
        assert_eq!(s.due(10.0), 800);
        assert_eq!(s.due(99.0), 800);
        let mut flat = s.clone();
        flat.ramp_s = 0;
        assert_eq!(flat.due(1.5), 150);
        assert_eq!(flat.total_tasks(), 1_000);
    }

    #[test]
    fn the_duration_round_trips_through_the_input() {
        assert_eq!(
            simulated_duration_ms(input_header(123_456_789, 2_500).as_bytes()),
            Some(2_500)
        );
        assert_eq!(simulated_duration_ms(b"load n=1 ms=x;"), None);
        assert_eq!(simulated_duration_ms(b"something else"), None);
        assert_eq!(simulated_duration_ms(&[0xff; 80]), None);
        assert_eq!(simulated_duration_ms(b""), None);
    }

    #[test]
    fn bad_scenarios_are_typed_errors() {
        let base = r#"
            name = "t"
            seed = 1
            duration_s = 10
            rate = 10
            [workers]
            count = 5
            price_per_gpu_second = [1000, 1000]
            heartbeat_interval_ms = 1000
            mix = [{ weight = 1, gpus = 2 }]
            [[tasks]]
            name = "a"
            weight = 1
            priority = [1, 10]
            gpus = GPUS
            duration_ms = [10, 100]
            max_price_per_gpu_second = PRICE
        "#;
        let parse = |gpus: &str, price: &str| {
            Scenario::parse(
                &base.replace("GPUS", gpus).replace("PRICE", price),
                "inline",
            )
        };
        assert!(parse("2", "1000").is_ok());
        assert!(matches!(
            parse("3", "1000"),
            Err(ScenarioError::Invalid { .. })
        ));
        assert!(matches!(
            parse("1", "999"),
            Err(ScenarioError::Invalid { .. })
        ));
        assert!(matches!(
            Scenario::parse(&format!("{base}\nsurprise = 1"), "inline"),
            Err(ScenarioError::Parse { .. })
        ));
        assert!(matches!(
            Scenario::load(Path::new("/nonexistent/x.toml")),
            Err(ScenarioError::Read { .. })
        ));
    }

    #[test]
    fn weighted_picks_respect_zero_weights() {
        let mut rng = Rng::new(3);
        for _ in 0..1_000 {
            let i = rng.weighted(&[0, 5, 0, 1]);
            assert!(i == 1 || i == 3);
        }
        assert_eq!(rng.range(5, 5), 5);
        assert_eq!(rng.range(6, 5), 6);
        let u = rng.unit();
        assert!((0.0..1.0).contains(&u));
    }
}
