//! Percentage sampling decided from the trace id (the gateway setting
//! `tracing.random_sampling: 0-100`).
//!
//! OpenTelemetry's consistent probability sampling: the decision depends only
//! on the trace id and the percentage, so every node of a trace decides alike
//! without talking to the others, and a trace kept at some percentage is kept
//! at every higher one.

use crate::span::TraceId;

/// Randomness values and thresholds are 56-bit: the trace id's last 7 bytes,
/// the part W3C level 2 declares random when the random flag is set.
const RANDOMNESS_BITS: u32 = 56;

/// 2^56: the threshold that rejects everything.
const MAX_THRESHOLD: u64 = 1 << RANDOMNESS_BITS;

/// Decides which traces are recorded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    percentage: f64,
    /// Trace ids whose randomness value is below this are dropped.
    rejection_threshold: u64,
    parent_based: bool,
}

/// A sampler setting outside what [`Sampler::new`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// The percentage is NaN or outside 0..=100.
    #[error("sampling percentage {}", self.reason())]
    InvalidPercentage(f64),
}

impl SamplingError {
    /// Why the setting was refused, without naming it.
    pub fn reason(&self) -> String {
        match self {
            Self::InvalidPercentage(value) => format!("must be between 0 and 100, got {value}"),
        }
    }
}

/// Every trace kept, and a parent's sampled flag followed.
impl Default for Sampler {
    fn default() -> Self {
        Sampler {
            percentage: 100.0,
            rejection_threshold: 0,
            parent_based: true,
        }
    }
}

impl Sampler {
    /// A sampler keeping `percentage` percent of new traces. With
    /// `parent_based`, a request carrying a valid parent context follows the
    /// caller's sampled flag instead, so a trace is not cut in the middle.
    pub fn new(percentage: f64, parent_based: bool) -> Result<Sampler, SamplingError> {
        if !(0.0..=100.0).contains(&percentage) {
            // NaN fails `contains` too.
            return Err(SamplingError::InvalidPercentage(percentage));
        }
        let probability = percentage / 100.0;
        // Exact in f64: 2^56 is a power of two, and the product is at most 2^56.
        let rejection_threshold = ((1.0 - probability) * MAX_THRESHOLD as f64).round() as u64;
        Ok(Sampler {
            percentage,
            rejection_threshold,
            parent_based,
        })
    }

    /// Whether to record the trace `trace_id`. `parent_sampled` is the sampled
    /// flag of the request's valid parent context, None without one.
    pub fn should_sample(&self, trace_id: TraceId, parent_sampled: Option<bool>) -> bool {
        match parent_sampled {
            Some(sampled) if self.parent_based => sampled,
            _ => randomness(trace_id) >= self.rejection_threshold,
        }
    }

    /// The configured percentage, 0 to 100.
    pub fn percentage(&self) -> f64 {
        self.percentage
    }

    /// Whether a valid parent's sampled flag decides.
    pub fn is_parent_based(&self) -> bool {
        self.parent_based
    }

    /// The 56-bit rejection threshold T: trace ids whose randomness value is
    /// below it are not sampled.
    pub fn rejection_threshold(&self) -> u64 {
        self.rejection_threshold
    }
}

/// The randomness value R: the right-most 56 bits of the trace id, big-endian.
pub fn randomness(trace_id: TraceId) -> u64 {
    let [_, _, _, _, _, _, _, _, _, r @ ..] = trace_id.0;
    let mut be = [0; 8];
    be[1..].copy_from_slice(&r);
    u64::from_be_bytes(be)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_ids(count: usize, seed: u64) -> impl Iterator<Item = TraceId> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count).map(move |_| {
            let mut id = TraceId::default();
            rng.fill_bytes(&mut id.0);
            id
        })
    }

    fn sampled_count(sampler: &Sampler, count: usize) -> usize {
        random_ids(count, 42)
            .filter(|&id| sampler.should_sample(id, None))
            .count()
    }

    fn id_with_randomness(r: u64) -> TraceId {
        let mut id = TraceId([0xaa; 16]);
        id.0[9..].copy_from_slice(&r.to_be_bytes()[1..]);
        id
    }

    #[test]
    fn zero_percent_samples_nothing() {
        let sampler = Sampler::new(0.0, false).unwrap();
        assert_eq!(sampled_count(&sampler, 10_000), 0);
        assert!(!sampler.should_sample(id_with_randomness(MAX_THRESHOLD - 1), None));
        assert!(!sampler.should_sample(TraceId([0xff; 16]), None));
    }

    #[test]
    fn hundred_percent_samples_everything() {
        let sampler = Sampler::new(100.0, false).unwrap();
        assert_eq!(sampled_count(&sampler, 10_000), 10_000);
        assert!(sampler.should_sample(id_with_randomness(0), None));
    }

    #[test]
    fn twenty_five_percent_samples_about_a_quarter() {
        let sampler = Sampler::new(25.0, false).unwrap();
        let sampled = sampled_count(&sampler, 100_000);
        assert!((23_000..=27_000).contains(&sampled), "{sampled} of 100000");
    }

    #[test]
    fn randomness_is_the_last_seven_bytes_of_the_trace_id() {
        let id = TraceId([
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7,
        ]);
        assert_eq!(randomness(id), 0x01_02_03_04_05_06_07);
        assert_eq!(randomness(id_with_randomness(12345)), 12345);
    }

    #[test]
    fn threshold_is_one_minus_probability_times_2_pow_56_rounded() {
        assert_eq!(
            Sampler::new(0.0, true).unwrap().rejection_threshold(),
            1 << 56
        );
        assert_eq!(Sampler::new(100.0, true).unwrap().rejection_threshold(), 0);
        assert_eq!(
            Sampler::new(50.0, true).unwrap().rejection_threshold(),
            1 << 55
        );
        assert_eq!(
            Sampler::new(25.0, true).unwrap().rejection_threshold(),
            3 << 54
        );
        let at_50 = Sampler::new(50.0, false).unwrap();
        assert!(at_50.should_sample(id_with_randomness(1 << 55), None));
        assert!(!at_50.should_sample(id_with_randomness((1 << 55) - 1), None));
    }

    #[test]
    fn the_same_id_always_decides_alike() {
        let sampler = Sampler::new(37.5, false).unwrap();
        let other_node = Sampler::new(37.5, false).unwrap();
        for id in random_ids(1_000, 7) {
            let decision = sampler.should_sample(id, None);
            assert_eq!(sampler.should_sample(id, None), decision);
            assert_eq!(other_node.should_sample(id, None), decision);
        }
    }

    #[test]
    fn parent_based_follows_a_sampled_or_unsampled_parent() {
        let never = Sampler::new(0.0, true).unwrap();
        let always = Sampler::new(100.0, true).unwrap();
        for id in random_ids(100, 8) {
            assert!(never.should_sample(id, Some(true)));
            assert!(!always.should_sample(id, Some(false)));
            assert!(!never.should_sample(id, None));
            assert!(always.should_sample(id, None));
        }
        assert!(always.is_parent_based());
    }

    #[test]
    fn non_parent_based_ignores_the_parent() {
        let never = Sampler::new(0.0, false).unwrap();
        let always = Sampler::new(100.0, false).unwrap();
        for id in random_ids(100, 9) {
            assert!(!never.should_sample(id, Some(true)));
            assert!(always.should_sample(id, Some(false)));
        }
        assert!(!never.is_parent_based());
    }

    #[test]
    fn a_trace_sampled_at_10_percent_is_sampled_at_50_percent() {
        let at_10 = Sampler::new(10.0, false).unwrap();
        let at_50 = Sampler::new(50.0, false).unwrap();
        let mut sampled_at_10 = 0;
        for id in random_ids(20_000, 10).filter(|&id| at_10.should_sample(id, None)) {
            sampled_at_10 += 1;
            assert!(at_50.should_sample(id, None), "{id:?}");
        }
        assert!(sampled_at_10 > 0);
        let percentages = [0.0, 0.1, 1.0, 10.0, 33.3, 50.0, 99.9, 100.0];
        for pair in percentages.windows(2) {
            let (lower, higher) = (
                Sampler::new(pair[0], false).unwrap(),
                Sampler::new(pair[1], false).unwrap(),
            );
            assert!(lower.rejection_threshold() >= higher.rejection_threshold());
        }
    }

    #[test]
    fn invalid_percentages_are_errors() {
        for value in [-0.1, 100.1, -1.0, 1000.0, f64::INFINITY, f64::NEG_INFINITY] {
            let err = Sampler::new(value, true).unwrap_err();
            assert_eq!(err, SamplingError::InvalidPercentage(value));
            assert!(err.to_string().contains(&value.to_string()), "{err}");
        }
        let nan = Sampler::new(f64::NAN, false).unwrap_err();
        assert!(nan.to_string().contains("NaN"), "{nan}");
    }

    #[test]
    fn the_default_keeps_everything_and_follows_the_parent() {
        assert_eq!(Sampler::default(), Sampler::new(100.0, true).unwrap());
    }

    #[test]
    fn valid_percentages_are_kept() {
        for value in [0.0, -0.0, 0.001, 25.0, 100.0] {
            assert_eq!(Sampler::new(value, false).unwrap().percentage(), value);
        }
    }
}
