//! Placement scoring, per the Cocoon recommendations: current load 30%, free GPU memory 30%, historical task
//! time 20%, network latency 10%, task affinity 10%. Pure functions of a worker's state and a task's needs.
//!
//! Every component lies in `0.0..=1.0`, higher is better, so the total does too. All but affinity depend on
//! the worker alone (its *base* score), which lets the pool keep workers ordered by base score and find the
//! best fit without scoring every worker (see [`crate::pool`]).

use events::Nanoton;
use events::allocations::ScoreBreakdown;
use events::payload::Requirements;

pub const WEIGHT_LOAD: f64 = 0.30;
pub const WEIGHT_MEMORY: f64 = 0.30;
pub const WEIGHT_HISTORY: f64 = 0.20;
pub const WEIGHT_LATENCY: f64 = 0.10;
pub const WEIGHT_AFFINITY: f64 = 0.10;

/// A task time of this many seconds scores 0.5 on history; shorter is better.
pub const HISTORY_HALF_SECONDS: f64 = 60.0;
/// A round trip of this many milliseconds scores 0.5 on latency; shorter is better.
pub const LATENCY_HALF_MS: f64 = 20.0;
/// What an unknown history or latency scores: neither rewarded nor punished.
pub const UNKNOWN: f64 = 0.5;

/// One GPU as the allocator sees it: telemetry plus what it has reserved itself.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSlot {
    pub index: u32,
    pub memory_total_mib: u64,
    /// From the newest heartbeat.
    pub memory_used_mib: u64,
    /// Reserved by allocations that have not ended.
    pub memory_reserved_mib: u64,
    pub utilization_pct: u8,
}

impl GpuSlot {
    /// Memory a new task can count on: the heartbeat's used memory already includes running tasks, the
    /// reservation covers tasks that have not started (or been reported) yet, so take the larger.
    pub fn free_mib(&self) -> u64 {
        self.memory_total_mib
            .saturating_sub(self.memory_used_mib.max(self.memory_reserved_mib))
    }
}

/// The worker-side inputs of a score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerLoad<'a> {
    pub gpus: &'a [GpuSlot],
    pub running: u32,
    pub max_concurrent: u32,
    /// Mean wall time of the worker's completed tasks, when it has any.
    pub mean_task_ms: Option<f64>,
    pub latency_us: Option<u32>,
}

/// The task-independent components: load, memory, history, latency (affinity left at 0).
pub fn base(w: &WorkerLoad<'_>) -> ScoreBreakdown {
    let slots = if w.max_concurrent == 0 {
        1.0
    } else {
        (f64::from(w.running) / f64::from(w.max_concurrent)).min(1.0)
    };
    let utilization = if w.gpus.is_empty() {
        1.0
    } else {
        w.gpus
            .iter()
            .map(|g| f64::from(g.utilization_pct.min(100)) / 100.0)
            .sum::<f64>()
            / w.gpus.len() as f64
    };
    let load = 1.0 - 0.5 * slots - 0.5 * utilization;
    // In f64: the sizes come from the worker's registration, and a sum of u64s could overflow.
    let total_mib: f64 = w.gpus.iter().map(|g| g.memory_total_mib as f64).sum();
    let memory = if total_mib == 0.0 {
        0.0
    } else {
        w.gpus.iter().map(|g| g.free_mib() as f64).sum::<f64>() / total_mib
    };
    let history = w.mean_task_ms.map_or(UNKNOWN, |ms| {
        HISTORY_HALF_SECONDS / (HISTORY_HALF_SECONDS + ms.max(0.0) / 1000.0)
    });
    let latency = w.latency_us.map_or(UNKNOWN, |us| {
        LATENCY_HALF_MS / (LATENCY_HALF_MS + f64::from(us) / 1000.0)
    });
    let mut s = ScoreBreakdown {
        total: 0.0,
        load: clamp(load),
        memory: clamp(memory),
        history: clamp(history),
        latency: clamp(latency),
        affinity: 0.0,
    };
    s.total = total(&s);
    s
}

/// The base score with the affinity component set.
pub fn with_affinity(mut s: ScoreBreakdown, affine: bool) -> ScoreBreakdown {
    s.affinity = if affine { 1.0 } else { 0.0 };
    s.total = total(&s);
    s
}

fn total(s: &ScoreBreakdown) -> f64 {
    WEIGHT_LOAD * s.load
        + WEIGHT_MEMORY * s.memory
        + WEIGHT_HISTORY * s.history
        + WEIGHT_LATENCY * s.latency
        + WEIGHT_AFFINITY * s.affinity
}

fn clamp(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// The worker-side inputs of a fit check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer<'a> {
    pub gpus: &'a [GpuSlot],
    pub price_per_gpu_second: Nanoton,
    /// Empty: any model.
    pub model_tags: &'a [String],
}

/// Why a worker cannot take a task (now, or ever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    TooFewGpus {
        needed: u16,
        has: usize,
    },
    NotEnoughMemory {
        needed_mib: u64,
        gpus_with_enough: usize,
    },
    TooExpensive {
        price: Nanoton,
        max: Nanoton,
    },
    ModelTag {
        wanted: String,
    },
}

/// Whether the worker's offer satisfies the task's static needs, ignoring current use: could it *ever* fit?
pub fn could_ever_fit(
    offer: &Offer<'_>,
    req: &Requirements,
    max_price: Nanoton,
) -> Result<(), Misfit> {
    static_checks(offer, req, max_price)?;
    let big_enough = offer
        .gpus
        .iter()
        .filter(|g| g.memory_total_mib >= req.gpu_memory_mib)
        .count();
    if big_enough < usize::from(req.gpu_count) {
        return Err(Misfit::NotEnoughMemory {
            needed_mib: req.gpu_memory_mib,
            gpus_with_enough: big_enough,
        });
    }
    Ok(())
}

/// The GPUs the task would get now: the `gpu_count` GPUs with the most free memory, each with at least
/// `gpu_memory_mib` free; ordered by GPU index.
pub fn place(
    offer: &Offer<'_>,
    req: &Requirements,
    max_price: Nanoton,
) -> Result<Vec<u32>, Misfit> {
    static_checks(offer, req, max_price)?;
    let needed = usize::from(req.gpu_count);
    let mut roomy: Vec<&GpuSlot> = offer
        .gpus
        .iter()
        .filter(|g| g.free_mib() >= req.gpu_memory_mib)
        .collect();
    if roomy.len() < needed {
        return Err(Misfit::NotEnoughMemory {
            needed_mib: req.gpu_memory_mib,
            gpus_with_enough: roomy.len(),
        });
    }
    roomy.sort_by(|a, b| b.free_mib().cmp(&a.free_mib()).then(a.index.cmp(&b.index)));
    let mut chosen: Vec<u32> = roomy[..needed].iter().map(|g| g.index).collect();
    chosen.sort_unstable();
    Ok(chosen)
}

fn static_checks(offer: &Offer<'_>, req: &Requirements, max_price: Nanoton) -> Result<(), Misfit> {
    if req.gpu_count == 0 || offer.gpus.len() < usize::from(req.gpu_count) {
        return Err(Misfit::TooFewGpus {
            needed: req.gpu_count,
            has: offer.gpus.len(),
        });
    }
    if offer.price_per_gpu_second > max_price {
        return Err(Misfit::TooExpensive {
            price: offer.price_per_gpu_second,
            max: max_price,
        });
    }
    if let Some(tag) = &req.model_tag
        && !offer.model_tags.is_empty()
        && !offer.model_tags.iter().any(|t| t == tag)
    {
        return Err(Misfit::ModelTag {
            wanted: tag.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, total: u64, used: u64, reserved: u64, util: u8) -> GpuSlot {
        GpuSlot {
            index,
            memory_total_mib: total,
            memory_used_mib: used,
            memory_reserved_mib: reserved,
            utilization_pct: util,
        }
    }

    fn load<'a>(gpus: &'a [GpuSlot], running: u32) -> WorkerLoad<'a> {
        WorkerLoad {
            gpus,
            running,
            max_concurrent: 4,
            mean_task_ms: None,
            latency_us: None,
        }
    }

    fn req(count: u16, mib: u64, tag: Option<&str>) -> Requirements {
        Requirements {
            gpu_count: count,
            gpu_memory_mib: mib,
            model_tag: tag.map(str::to_owned),
        }
    }

    #[test]
    fn absurd_memory_sizes_from_a_registration_score_without_overflow() {
        let gpus = [gpu(0, u64::MAX, 0, 0, 0), gpu(1, u64::MAX, 0, 0, 0)];
        let s = base(&load(&gpus, 0));
        assert!((s.memory - 1.0).abs() < 1e-12, "{s:?}");
        assert!(s.total.is_finite(), "{s:?}");
    }

    #[test]
    fn weights_sum_to_one_and_an_ideal_worker_scores_one() {
        let sum = WEIGHT_LOAD + WEIGHT_MEMORY + WEIGHT_HISTORY + WEIGHT_LATENCY + WEIGHT_AFFINITY;
        assert!((sum - 1.0).abs() < 1e-12);
        let gpus = [gpu(0, 80_000, 0, 0, 0)];
        let mut w = load(&gpus, 0);
        w.mean_task_ms = Some(0.0);
        w.latency_us = Some(0);
        let s = with_affinity(base(&w), true);
        assert!((s.total - 1.0).abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn each_component_moves_the_total_by_its_weight() {
        let idle = [gpu(0, 80_000, 0, 0, 0)];
        let busy = [gpu(0, 80_000, 0, 0, 100)];
        let full = [gpu(0, 80_000, 80_000, 0, 0)];
        let a = base(&load(&idle, 0));
        // Utilization 100% halves load (the other half is the slots in use).
        let b = base(&load(&busy, 0));
        assert!((a.total - b.total - WEIGHT_LOAD * 0.5).abs() < 1e-12);
        // No free memory loses the whole memory weight.
        let c = base(&load(&full, 0));
        assert!((a.total - c.total - WEIGHT_MEMORY).abs() < 1e-12);
        // Running 2 of 4 slots costs a quarter of the load weight.
        let d = base(&load(&idle, 2));
        assert!((a.total - d.total - WEIGHT_LOAD * 0.25).abs() < 1e-12);
        // Affinity adds exactly its weight.
        let e = with_affinity(a.clone(), true);
        assert!((e.total - a.total - WEIGHT_AFFINITY).abs() < 1e-12);
    }

    #[test]
    fn faster_history_and_lower_latency_score_higher() {
        let gpus = [gpu(0, 80_000, 0, 0, 0)];
        let mut fast = load(&gpus, 0);
        fast.mean_task_ms = Some(5_000.0);
        fast.latency_us = Some(1_000);
        let mut slow = fast;
        slow.mean_task_ms = Some(300_000.0);
        slow.latency_us = Some(80_000);
        let (f, s) = (base(&fast), base(&slow));
        assert!(f.history > s.history && f.latency > s.latency && f.total > s.total);
        // Half-points: 60 s of history and 20 ms of latency score 0.5, as does not knowing.
        let mut half = fast;
        half.mean_task_ms = Some(60_000.0);
        half.latency_us = Some(20_000);
        let h = base(&half);
        assert!((h.history - 0.5).abs() < 1e-12 && (h.latency - 0.5).abs() < 1e-12);
        let unknown = base(&load(&gpus, 0));
        assert_eq!((unknown.history, unknown.latency), (UNKNOWN, UNKNOWN));
    }

    #[test]
    fn reservations_count_as_used_memory() {
        let g = gpu(0, 80_000, 10_000, 30_000, 0);
        assert_eq!(g.free_mib(), 50_000);
        let g = gpu(0, 80_000, 70_000, 30_000, 0);
        assert_eq!(g.free_mib(), 10_000);
        let g = gpu(0, 80_000, 90_000, 0, 0);
        assert_eq!(g.free_mib(), 0);
    }

    #[test]
    fn placement_takes_the_roomiest_gpus_and_checks_every_need() {
        let gpus = [
            gpu(0, 80_000, 70_000, 0, 0),
            gpu(1, 80_000, 0, 0, 0),
            gpu(2, 80_000, 20_000, 0, 0),
            gpu(3, 40_000, 0, 0, 0),
        ];
        let tags = ["llama".to_owned()];
        let offer = Offer {
            gpus: &gpus,
            price_per_gpu_second: Nanoton(100),
            model_tags: &tags,
        };
        assert_eq!(
            place(&offer, &req(2, 30_000, None), Nanoton(100)),
            Ok(vec![1, 2])
        );
        assert_eq!(
            place(&offer, &req(1, 10_000, Some("llama")), Nanoton(100)),
            Ok(vec![1])
        );
        assert_eq!(
            place(&offer, &req(3, 50_000, None), Nanoton(100)),
            Err(Misfit::NotEnoughMemory {
                needed_mib: 50_000,
                gpus_with_enough: 2
            })
        );
        assert_eq!(
            place(&offer, &req(5, 1, None), Nanoton(100)),
            Err(Misfit::TooFewGpus { needed: 5, has: 4 })
        );
        assert_eq!(
            place(&offer, &req(1, 1, None), Nanoton(99)),
            Err(Misfit::TooExpensive {
                price: Nanoton(100),
                max: Nanoton(99)
            })
        );
        assert_eq!(
            place(&offer, &req(1, 1, Some("mistral")), Nanoton(100)),
            Err(Misfit::ModelTag {
                wanted: "mistral".into()
            })
        );
        // Busy now, but it could fit once its tasks end.
        assert!(could_ever_fit(&offer, &req(3, 50_000, None), Nanoton(100)).is_ok());
        assert_eq!(
            could_ever_fit(&offer, &req(4, 50_000, None), Nanoton(100)),
            Err(Misfit::NotEnoughMemory {
                needed_mib: 50_000,
                gpus_with_enough: 3
            })
        );
        assert!(could_ever_fit(&offer, &req(4, 40_000, None), Nanoton(100)).is_ok());
        // A worker without tags takes any model.
        let any = Offer {
            model_tags: &[],
            ..offer
        };
        assert!(place(&any, &req(1, 1, Some("mistral")), Nanoton(100)).is_ok());
    }
}
