//! Money and usage as integers: nanoton amounts and milli-GPU-seconds. Floats never hold money.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of TON in nanoton (1 TON = 10^9 nanoton).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanoton(pub u64);

impl Nanoton {
    pub const ZERO: Nanoton = Nanoton(0);
    pub const PER_TON: u64 = 1_000_000_000;

    pub fn checked_add(self, other: Nanoton) -> Option<Nanoton> {
        self.0.checked_add(other.0).map(Nanoton)
    }

    pub fn checked_sub(self, other: Nanoton) -> Option<Nanoton> {
        self.0.checked_sub(other.0).map(Nanoton)
    }
}

impl fmt::Display for Nanoton {
    /// Shows TON with all nine decimals, so no rounding ever hides a nanoton.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09} TON",
            self.0 / Self::PER_TON,
            self.0 % Self::PER_TON
        )
    }
}

/// GPU usage in thousandths of a GPU-second (one GPU busy for 1 ms = 1).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct GpuMillis(pub u64);

impl GpuMillis {
    /// What this usage costs at `price` per GPU-second, rounded down to the nanoton.
    /// `None` on overflow: the caller must treat that as an invalid event, never wrap.
    pub fn cost(self, price_per_gpu_second: Nanoton) -> Option<Nanoton> {
        let product = u128::from(self.0) * u128::from(price_per_gpu_second.0);
        u64::try_from(product / 1000).ok().map(Nanoton)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_integer_and_rounds_down() {
        assert_eq!(GpuMillis(1500).cost(Nanoton(1000)), Some(Nanoton(1500)));
        assert_eq!(GpuMillis(1).cost(Nanoton(999)), Some(Nanoton(0)));
        assert_eq!(GpuMillis(u64::MAX).cost(Nanoton(u64::MAX)), None);
    }

    #[test]
    fn display_keeps_every_nanoton() {
        assert_eq!(Nanoton(1_000_000_001).to_string(), "1.000000001 TON");
    }
}
