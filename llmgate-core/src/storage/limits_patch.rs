//! A change to some of a key's own limits, which the store applies to the limits the key
//! has when it writes: two changes of different limits made at once (by two admins, or
//! on two replicas sharing the database) then both hold, where writing back limits read
//! earlier would drop one of them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::limits::KeyLimits;

/// One of a key's own limits: a field of [`KeyLimits`], named as in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitField {
    /// [`KeyLimits::models`]
    Models,
    /// [`KeyLimits::rpm`]
    Rpm,
    /// [`KeyLimits::tpm`]
    Tpm,
    /// [`KeyLimits::max_parallel`]
    MaxParallel,
    /// [`KeyLimits::quota_tokens`]
    QuotaTokens,
    /// [`KeyLimits::quota_period`]
    QuotaPeriod,
    /// [`KeyLimits::weight`]
    Weight,
    /// [`KeyLimits::per_user_rpm`]
    PerUserRpm,
    /// [`KeyLimits::per_user_quota_tokens`]
    PerUserQuotaTokens,
}

impl LimitField {
    /// Every field, in the order of [`KeyLimits`].
    pub const ALL: [LimitField; 9] = [
        Self::Models,
        Self::Rpm,
        Self::Tpm,
        Self::MaxParallel,
        Self::QuotaTokens,
        Self::QuotaPeriod,
        Self::Weight,
        Self::PerUserRpm,
        Self::PerUserQuotaTokens,
    ];

    /// The field's name in JSON (`"max_parallel"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Models => "models",
            Self::Rpm => "rpm",
            Self::Tpm => "tpm",
            Self::MaxParallel => "max_parallel",
            Self::QuotaTokens => "quota_tokens",
            Self::QuotaPeriod => "quota_period",
            Self::Weight => "weight",
            Self::PerUserRpm => "per_user_rpm",
            Self::PerUserQuotaTokens => "per_user_quota_tokens",
        }
    }

    /// The field named `name` in JSON; `None` for any other name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|field| field.as_str() == name)
    }

    /// Unsets this field of `limits` (it falls back to the defaults).
    pub fn clear(self, limits: &mut KeyLimits) {
        match self {
            Self::Models => limits.models = None,
            Self::Rpm => limits.rpm = None,
            Self::Tpm => limits.tpm = None,
            Self::MaxParallel => limits.max_parallel = None,
            Self::QuotaTokens => limits.quota_tokens = None,
            Self::QuotaPeriod => limits.quota_period = None,
            Self::Weight => limits.weight = None,
            Self::PerUserRpm => limits.per_user_rpm = None,
            Self::PerUserQuotaTokens => limits.per_user_quota_tokens = None,
        }
    }
}

/// What [`KeyUpdate::limits`](super::KeyUpdate::limits) changes: the fields in
/// [`clear`](Self::clear) are unset, then each field that is `Some` in
/// [`set`](Self::set) is set; the others stay as the key has them when the store writes.
/// The default changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsPatch {
    /// Limits to unset.
    pub clear: BTreeSet<LimitField>,
    /// Limits to set: its fields that are `Some`.
    pub set: KeyLimits,
}

impl LimitsPatch {
    /// A patch that makes a key's limits `limits`, whatever they were.
    pub fn replacing(limits: KeyLimits) -> Self {
        Self {
            clear: LimitField::ALL.into(),
            set: limits,
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.clear.is_empty() && self.set.is_empty()
    }

    /// Applies the patch to `limits`.
    pub fn apply(&self, limits: &mut KeyLimits) {
        fn set<T: Clone>(own: &mut Option<T>, new: &Option<T>) {
            if new.is_some() {
                own.clone_from(new);
            }
        }
        for field in &self.clear {
            field.clear(limits);
        }
        // Every field named, so that a new one cannot be forgotten here.
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
        } = &self.set;
        set(&mut limits.models, models);
        set(&mut limits.rpm, rpm);
        set(&mut limits.tpm, tpm);
        set(&mut limits.max_parallel, max_parallel);
        set(&mut limits.quota_tokens, quota_tokens);
        set(&mut limits.quota_period, quota_period);
        set(&mut limits.weight, weight);
        set(&mut limits.per_user_rpm, per_user_rpm);
        set(&mut limits.per_user_quota_tokens, per_user_quota_tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::QuotaPeriod;

    fn every_limit() -> KeyLimits {
        KeyLimits {
            models: Some(vec!["gemma-*".into()]),
            rpm: Some(1),
            tpm: Some(2),
            max_parallel: Some(3),
            quota_tokens: Some(4),
            quota_period: Some(QuotaPeriod::Day),
            weight: Some(5),
            per_user_rpm: Some(6),
            per_user_quota_tokens: Some(7),
        }
    }

    #[test]
    fn the_fields_are_those_of_key_limits_by_their_json_names() {
        let serde_json::Value::Object(json) = serde_json::to_value(every_limit()).unwrap() else {
            unreachable!("limits serialize to an object")
        };
        let mut theirs: Vec<&str> = json.keys().map(String::as_str).collect();
        let mut ours: Vec<&str> = LimitField::ALL.iter().map(|f| f.as_str()).collect();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs);
        for field in LimitField::ALL {
            assert_eq!(LimitField::from_name(field.as_str()), Some(field));
            assert_eq!(serde_json::to_value(field).unwrap(), field.as_str());
            // Clearing a field unsets exactly that one.
            let mut limits = every_limit();
            field.clear(&mut limits);
            let serde_json::Value::Object(left) = serde_json::to_value(&limits).unwrap() else {
                unreachable!()
            };
            assert!(!left.contains_key(field.as_str()), "{field:?}");
            assert_eq!(left.len(), LimitField::ALL.len() - 1, "{field:?}");
        }
        assert_eq!(LimitField::from_name("burst"), None);
    }

    #[test]
    fn a_patch_clears_then_sets_and_leaves_the_rest() {
        let mut limits = every_limit();
        let patch = LimitsPatch {
            clear: [LimitField::Rpm, LimitField::Tpm].into(),
            set: KeyLimits {
                tpm: Some(20),
                weight: Some(50),
                ..KeyLimits::default()
            },
        };
        patch.apply(&mut limits);
        assert_eq!(
            limits,
            KeyLimits {
                rpm: None,
                tpm: Some(20),
                weight: Some(50),
                ..every_limit()
            }
        );

        let mut limits = every_limit();
        LimitsPatch::default().apply(&mut limits);
        assert_eq!(limits, every_limit());
        assert!(LimitsPatch::default().is_empty());

        let only_rpm = KeyLimits {
            rpm: Some(9),
            ..KeyLimits::default()
        };
        LimitsPatch::replacing(only_rpm.clone()).apply(&mut limits);
        assert_eq!(limits, only_rpm);
    }
}
