//! When signing keys are published, sign, retire and disappear: pure
//! functions over unix-second timestamps, so the rules can be tested
//! without clocks, databases or sleeps.
//!
//! A key goes through four states:
//!
//! ```text
//!  created ──publish_delay──▶ activates ──(next key activates)──▶ retired ──retire_grace──▶ removed
//!  [published: in JWKS]      [active: in JWKS, signs]             [in JWKS]                 [gone]
//! ```
//!
//! - **published**: in the JWKS, signs nothing. Verifiers (the gateway
//!   caches the JWKS) get `publish_delay` to learn the key before any token
//!   names it.
//! - **active**: the newest key whose activation time has passed; the only
//!   one that signs.
//! - **retired**: a newer key has become active. It stays in the JWKS for
//!   `retire_grace` (the access-token lifetime plus the verifiers' clock
//!   leeway), so every token it signed can still be verified until it
//!   expires.
//! - **removed**: out of the JWKS; its row may be deleted.
//!
//! Only activation times are stored: a key's retirement is the activation
//! of its successor, so replicas that agree on the rows agree on the states.

/// The timing rules, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Between a key's publication and its first signature.
    pub publish_delay: i64,
    /// Between two activations; `None` never rotates.
    pub rotation: Option<i64>,
    /// How long a retired key stays published.
    pub retire_grace: i64,
}

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// In the JWKS, not signing yet.
    Published,
    /// In the JWKS and signing.
    Active,
    /// In the JWKS until the tokens it signed have expired.
    Retired,
    /// No longer published.
    Removed,
}

impl KeyState {
    /// Whether the key belongs in the JWKS.
    pub fn is_published(self) -> bool {
        !matches!(self, KeyState::Removed)
    }
}

/// What the schedule needs to know of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTimes {
    /// Creation order; unique.
    pub generation: i64,
    /// When it starts (or started) signing.
    pub activates_at: i64,
}

/// The state of each of `keys` (sorted by generation) at `now`.
pub fn states(schedule: &Schedule, keys: &[KeyTimes], now: i64) -> Vec<KeyState> {
    let active = keys.iter().rposition(|k| k.activates_at <= now);
    keys.iter()
        .enumerate()
        .map(|(i, key)| match active {
            Some(a) if i == a => KeyState::Active,
            Some(a) if i < a => {
                // Retired when its successor activated.
                let retired_at = keys[i + 1].activates_at;
                if now >= retired_at.saturating_add(schedule.retire_grace) {
                    KeyState::Removed
                } else {
                    KeyState::Retired
                }
            }
            _ => {
                debug_assert!(key.activates_at > now);
                KeyState::Published
            }
        })
        .collect()
}

/// What [`plan`] asks the store to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Create a key activating at this time.
    pub create: Option<i64>,
    /// Delete the keys of these generations.
    pub remove: Vec<i64>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.create.is_none() && self.remove.is_empty()
    }
}

/// What to change at `now`, given `keys` sorted by generation.
///
/// - No key at all (first start): create one that signs at once. Nothing
///   was ever signed, so no verifier can be waiting for it.
/// - Rotation due (the active key has signed for `rotation - publish_delay`)
///   and no successor pending: create one that activates `publish_delay`
///   from now, so the active key's total signing time is `rotation`.
/// - Keys past their retirement grace: remove them.
pub fn plan(schedule: &Schedule, keys: &[KeyTimes], now: i64) -> Plan {
    let states = states(schedule, keys, now);
    let remove = keys
        .iter()
        .zip(&states)
        .filter(|(_, s)| **s == KeyState::Removed)
        .map(|(k, _)| k.generation)
        .collect();
    let pending = states.contains(&KeyState::Published);
    let active = keys
        .iter()
        .zip(&states)
        .find(|(_, s)| **s == KeyState::Active)
        .map(|(k, _)| k);
    let create = match (active, schedule.rotation) {
        _ if keys.is_empty() => Some(now),
        (Some(active), Some(rotation)) if !pending => {
            let due = active
                .activates_at
                .saturating_add(rotation)
                .saturating_sub(schedule.publish_delay);
            (now >= due).then(|| now.saturating_add(schedule.publish_delay))
        }
        _ => None,
    };
    Plan { create, remove }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: i64 = 600;
    const GRACE: i64 = 960;
    const DAY: i64 = 86_400;

    fn schedule() -> Schedule {
        Schedule {
            publish_delay: DELAY,
            rotation: Some(DAY),
            retire_grace: GRACE,
        }
    }

    /// Applies `plan` the way the store does.
    fn apply(keys: &mut Vec<KeyTimes>, plan: &Plan) {
        keys.retain(|k| !plan.remove.contains(&k.generation));
        if let Some(activates_at) = plan.create {
            let generation = keys.last().map_or(1, |k| k.generation + 1);
            keys.push(KeyTimes {
                generation,
                activates_at,
            });
        }
    }

    #[test]
    fn the_first_key_signs_at_once() {
        let s = schedule();
        let plan = plan(&s, &[], 1000);
        assert_eq!(plan.create, Some(1000));
        let mut keys = Vec::new();
        apply(&mut keys, &plan);
        assert_eq!(states(&s, &keys, 1000), [KeyState::Active]);
        // Nothing more to do until rotation is due.
        assert!(super::plan(&s, &keys, 1000 + DAY - DELAY - 1).is_empty());
    }

    #[test]
    fn a_new_key_is_published_before_it_signs_and_the_old_one_outlives_its_tokens() {
        let s = schedule();
        let t0 = 1_000_000;
        let mut keys = vec![KeyTimes {
            generation: 1,
            activates_at: t0,
        }];

        // Rotation falls due publish_delay before a day of signing.
        let due = t0 + DAY - DELAY;
        assert!(plan(&s, &keys, due - 1).is_empty());
        let p = plan(&s, &keys, due);
        assert_eq!(p.create, Some(t0 + DAY), "activates publish_delay later");
        apply(&mut keys, &p);

        // Published, not signing: the old key still signs.
        for now in [due, due + DELAY / 2, t0 + DAY - 1] {
            assert_eq!(
                states(&s, &keys, now),
                [KeyState::Active, KeyState::Published],
                "at {now}"
            );
            assert!(plan(&s, &keys, now).is_empty(), "one pending key at a time");
        }

        // Activation: the new key signs, the old one is retired but published.
        let switch = t0 + DAY;
        assert_eq!(
            states(&s, &keys, switch),
            [KeyState::Retired, KeyState::Active]
        );
        // Until every token it signed has expired (+ leeway).
        assert_eq!(
            states(&s, &keys, switch + GRACE - 1),
            [KeyState::Retired, KeyState::Active]
        );
        assert_eq!(
            states(&s, &keys, switch + GRACE),
            [KeyState::Removed, KeyState::Active]
        );
        let p = plan(&s, &keys, switch + GRACE);
        assert_eq!(p.remove, [1]);
        assert_eq!(p.create, None);
        apply(&mut keys, &p);
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn every_instant_has_exactly_one_signer_and_it_was_published_long_enough() {
        let s = Schedule {
            publish_delay: 300,
            rotation: Some(3600),
            retire_grace: 960,
        };
        let mut keys = Vec::new();
        // created_at of each generation, as the store records it.
        let mut created = std::collections::HashMap::new();
        let start = 50_000;
        // Every 10 s, as the maintenance task runs, for 12 hours.
        for now in (start..start + 12 * 3600).step_by(10) {
            let p = plan(&s, &keys, now);
            apply(&mut keys, &p);
            if p.create.is_some() {
                created.insert(keys.last().unwrap().generation, now);
            }
            let st = states(&s, &keys, now);
            let active: Vec<_> = keys
                .iter()
                .zip(&st)
                .filter(|(_, s)| **s == KeyState::Active)
                .collect();
            assert_eq!(active.len(), 1, "at {now}: {st:?}");
            let signer = active[0].0;
            let published_for = now - created[&signer.generation];
            assert!(
                signer.generation == 1 || published_for >= s.publish_delay,
                "generation {} signs after {published_for} s in the JWKS",
                signer.generation
            );
            assert!(keys.len() <= 3, "at {now}: {keys:?}");
        }
        // Twelve hours of hourly rotation.
        assert!(keys.last().unwrap().generation >= 12);
    }

    #[test]
    fn a_long_outage_does_not_skip_the_publish_delay() {
        let s = schedule();
        let keys = vec![KeyTimes {
            generation: 1,
            activates_at: 0,
        }];
        let now = 10 * DAY;
        let p = plan(&s, &keys, now);
        assert_eq!(p.create, Some(now + DELAY));
        assert!(p.remove.is_empty(), "the only signer stays");
    }

    #[test]
    fn no_rotation_keeps_the_one_key() {
        let s = Schedule {
            rotation: None,
            ..schedule()
        };
        let keys = vec![KeyTimes {
            generation: 7,
            activates_at: 0,
        }];
        assert!(plan(&s, &keys, 1000 * DAY).is_empty());
        assert_eq!(states(&s, &keys, 1000 * DAY), [KeyState::Active]);
    }

    #[test]
    fn only_the_newest_activated_key_signs() {
        // Two keys already past activation (e.g. a replica was down): the
        // newer signs; the older is retired from the newer's activation.
        let s = schedule();
        let keys = [
            KeyTimes {
                generation: 1,
                activates_at: 0,
            },
            KeyTimes {
                generation: 2,
                activates_at: 100,
            },
            KeyTimes {
                generation: 3,
                activates_at: 5000,
            },
        ];
        assert_eq!(
            states(&s, &keys, 200),
            [KeyState::Retired, KeyState::Active, KeyState::Published]
        );
        assert_eq!(
            states(&s, &keys, 100 + GRACE),
            [KeyState::Removed, KeyState::Active, KeyState::Published]
        );
        assert!(KeyState::Retired.is_published());
        assert!(!KeyState::Removed.is_published());
    }
}
