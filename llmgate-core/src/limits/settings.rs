//! What a key may use: [`KeyLimits`], set per key and as defaults for all user keys.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// The largest `weight` a key may have.
pub const MAX_WEIGHT: u32 = 1000;
/// The most model patterns one key may list.
pub const MAX_MODEL_PATTERNS: usize = 100;

/// A key's limits. Every field is optional: a key's own value wins, then the defaults
/// of the configuration (`[key_defaults]`), then "no limit" (weight 1, every model).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Model names or globs (`*` and `?`) the key may use; an empty list allows all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Tokens (prompt and completion) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// Tokens per [`quota_period`](Self::quota_period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_tokens: Option<u64>,
    /// The period of `quota_tokens` (and `per_user_quota_tokens`); a month when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_period: Option<QuotaPeriod>,
    /// The key's share of a busy model, against other keys waiting for it (1 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Requests per minute for each end user of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user_rpm: Option<u32>,
    /// Tokens per quota period for each end user of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user_quota_tokens: Option<u64>,
}

impl KeyLimits {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        // Field by field (a new field cannot be missed: the pattern names them all), not
        // against a default: this runs on every request.
        let KeyLimits {
            models,
            rpm,
            tpm,
            max_parallel,
            quota_tokens,
            quota_period,
            weight,
            per_user_rpm,
            per_user_quota_tokens,
        } = self;
        models.is_none()
            && rpm.is_none()
            && tpm.is_none()
            && max_parallel.is_none()
            && quota_tokens.is_none()
            && quota_period.is_none()
            && weight.is_none()
            && per_user_rpm.is_none()
            && per_user_quota_tokens.is_none()
    }

    /// These limits, with each unset field taken from `defaults`.
    pub fn or(&self, defaults: &KeyLimits) -> KeyLimits {
        KeyLimits {
            models: self.models.clone().or_else(|| defaults.models.clone()),
            rpm: self.rpm.or(defaults.rpm),
            tpm: self.tpm.or(defaults.tpm),
            max_parallel: self.max_parallel.or(defaults.max_parallel),
            quota_tokens: self.quota_tokens.or(defaults.quota_tokens),
            quota_period: self.quota_period.or(defaults.quota_period),
            weight: self.weight.or(defaults.weight),
            per_user_rpm: self.per_user_rpm.or(defaults.per_user_rpm),
            per_user_quota_tokens: self
                .per_user_quota_tokens
                .or(defaults.per_user_quota_tokens),
        }
    }

    /// The fair-sharing weight: the set one, else 1.
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }

    /// The quota period: the set one, else a month.
    pub fn period(&self) -> QuotaPeriod {
        self.quota_period.unwrap_or_default()
    }

    /// Whether the key may use the model `name` (any model when no list is set or the
    /// list is empty).
    pub fn allows_model(&self, name: &str) -> bool {
        match &self.models {
            None => true,
            Some(patterns) if patterns.is_empty() => true,
            // No model has a longer name (the store keeps no longer ones), and the match
            // below is quadratic at worst: a client's megabyte name is refused unread.
            Some(_) if name.len() > crate::storage::MAX_MODEL_BYTES => false,
            Some(patterns) => patterns.iter().any(|p| glob_matches(p, name)),
        }
    }

    /// Whether any limit needs counting (anything but `models` and `weight`).
    pub fn counts(&self) -> bool {
        self.rpm.is_some()
            || self.tpm.is_some()
            || self.max_parallel.is_some()
            || self.quota_tokens.is_some()
            || self.per_user_rpm.is_some()
            || self.per_user_quota_tokens.is_some()
    }

    /// Every problem, each naming its field (`what` prefixes them, e.g. `key_defaults`).
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut zero = |field: &str, value: Option<u64>| {
            if value == Some(0) {
                problems.push(format!(
                    "{what}.{field} must be at least 1 (leave it unset for no limit)"
                ));
            }
        };
        zero("rpm", self.rpm.map(u64::from));
        zero("tpm", self.tpm);
        zero("max_parallel", self.max_parallel.map(u64::from));
        zero("per_user_rpm", self.per_user_rpm.map(u64::from));
        // A quota of 0 is allowed: a key that may not use any more tokens.
        if let Some(weight) = self.weight {
            if !(1..=MAX_WEIGHT).contains(&weight) {
                problems.push(format!(
                    "{what}.weight must be between 1 and {MAX_WEIGHT}, not {weight}"
                ));
            }
        }
        if let Some(models) = &self.models {
            if models.len() > MAX_MODEL_PATTERNS {
                problems.push(format!(
                    "{what}.models lists {} names; at most {MAX_MODEL_PATTERNS}",
                    models.len()
                ));
            }
            for model in models {
                if model.is_empty() || model.len() > crate::storage::MAX_MODEL_BYTES {
                    problems.push(format!(
                        "{what}.models: a name must be 1 to {} bytes",
                        crate::storage::MAX_MODEL_BYTES
                    ));
                    break;
                }
            }
        }
        problems
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters and `?`
/// for one; everything else must be equal.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative match with one backtrack point for the last `*`: linear in practice,
    // O(len²) at worst, never exponential.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The calendar period of a token quota, in UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    /// From 00:00 UTC.
    Day,
    /// From Monday 00:00 UTC.
    Week,
    /// From the first of the month, 00:00 UTC.
    #[default]
    Month,
}

impl QuotaPeriod {
    /// `"day"`, `"week"` or `"month"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Week => "week",
            QuotaPeriod::Month => "month",
        }
    }

    /// When the period holding `now` began.
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let day = now.date_naive();
        let first = match self {
            QuotaPeriod::Day => day,
            QuotaPeriod::Week => {
                day - Duration::days(i64::from(day.weekday().num_days_from_monday()))
            }
            QuotaPeriod::Month => day.with_day(1).unwrap_or(day),
        };
        midnight(first)
    }

    /// When the period holding `now` ends (the next one begins).
    pub fn end(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let start = self.start(now).date_naive();
        let next = match self {
            QuotaPeriod::Day => start + Duration::days(1),
            QuotaPeriod::Week => start + Duration::days(7),
            QuotaPeriod::Month => {
                let (year, month) = if start.month() == 12 {
                    (start.year() + 1, 1)
                } else {
                    (start.year(), start.month() + 1)
                };
                NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(start + Duration::days(31))
            }
        };
        midnight(next)
    }
}

impl std::str::FromStr for QuotaPeriod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "day" => Ok(QuotaPeriod::Day),
            "week" => Ok(QuotaPeriod::Week),
            "month" => Ok(QuotaPeriod::Month),
            other => Err(format!(
                "unknown quota period '{other}': expected day, week or month"
            )),
        }
    }
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_a_shell_does() {
        for (pattern, name, matches) in [
            ("gemma-*", "gemma-3-270m", true),
            ("gemma-*", "smollm", false),
            ("*", "anything", true),
            ("a?c", "abc", true),
            ("a?c", "abbc", false),
            ("*-instruct", "smollm2-135m-instruct", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_matches(pattern, name), matches, "{pattern} ~ {name}");
        }
        // A hostile pattern stays fast.
        let long = "a".repeat(2000);
        assert!(!glob_matches(&format!("{}b", "*a".repeat(100)), &long));
    }

    #[test]
    fn a_keys_values_win_over_the_defaults_and_empty_lists_allow_all() {
        let defaults = KeyLimits {
            rpm: Some(60),
            models: Some(vec!["small".into()]),
            ..KeyLimits::default()
        };
        let own = KeyLimits {
            rpm: Some(5),
            ..KeyLimits::default()
        };
        let effective = own.or(&defaults);
        assert_eq!(effective.rpm, Some(5));
        assert!(effective.allows_model("small") && !effective.allows_model("big"));
        let all = KeyLimits {
            models: Some(vec![]),
            ..KeyLimits::default()
        }
        .or(&defaults);
        assert!(all.allows_model("big"));
        assert_eq!(all.weight(), 1);
    }

    #[test]
    fn periods_start_at_the_calendar_boundary_in_utc() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 15, 30, 0).unwrap(); // a Wednesday
        assert_eq!(
            QuotaPeriod::Day.start(now),
            Utc.with_ymd_and_hms(2026, 12, 2, 0, 0, 0).unwrap()
        );
        assert_eq!(
            QuotaPeriod::Week.start(now),
            Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap()
        );
        assert_eq!(
            QuotaPeriod::Month.start(now),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            QuotaPeriod::Month.end(now),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            QuotaPeriod::Week.end(now),
            Utc.with_ymd_and_hms(2026, 12, 7, 0, 0, 0).unwrap()
        );
        assert_eq!(
            QuotaPeriod::Day.end(now),
            Utc.with_ymd_and_hms(2026, 12, 3, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn bad_values_are_all_reported() {
        let bad = KeyLimits {
            rpm: Some(0),
            weight: Some(0),
            models: Some(vec![String::new()]),
            ..KeyLimits::default()
        };
        let problems = bad.problems("key");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("key.rpm"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<KeyLimits>(r#"{"rpmm": 3}"#).is_err());
        let limits: KeyLimits =
            serde_json::from_str(r#"{"rpm": 3, "quota_period": "week"}"#).unwrap();
        assert_eq!(limits.period(), QuotaPeriod::Week);
    }
}
