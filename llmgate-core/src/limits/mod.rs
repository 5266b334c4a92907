//! Fair use: what each key may use ([`KeyLimits`]), set per key and as defaults.

mod settings;

pub use settings::{glob_matches, KeyLimits, QuotaPeriod, MAX_MODEL_PATTERNS, MAX_WEIGHT};
