//! Latency percentiles and medians.

use std::time::Duration;

/// Request latencies of one run, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn from_micros(mut micros: Vec<u64>) -> Self {
        micros.sort_unstable();
        Self(micros)
    }

    pub fn from_durations(durations: impl IntoIterator<Item = Duration>) -> Self {
        Self::from_micros(durations.into_iter().map(|d| d.as_micros() as u64).collect())
    }

    /// The `q` quantile (0.5 for the median) in milliseconds; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let index = ((self.0.len() - 1) as f64 * q).round() as usize;
        self.0[index] as f64 / 1000.0
    }

    pub fn p50(&self) -> f64 {
        self.quantile_ms(0.5)
    }

    pub fn p99(&self) -> f64 {
        self.quantile_ms(0.99)
    }
}

/// The median of some measurements (the mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians() {
        let latencies = Latencies::from_micros((1..=100).rev().map(|ms| ms * 1000).collect());
        assert_eq!(latencies.p50(), 51.0);
        assert_eq!(latencies.p99(), 99.0);
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
