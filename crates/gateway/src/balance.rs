//! Choosing an instance: power of two choices over in-flight requests.
//!
//! Two distinct instances are drawn at random and the one with fewer
//! requests in flight wins. This avoids both the herd behaviour of "always
//! the least loaded" (every gateway replica piling onto the same instance
//! between load updates) and the blindness of round robin to slow
//! instances, at the cost of two atomic loads.

use rand::Rng;

use crate::upstream::Endpoint;

/// Picks one of `candidates`; `None` only when there are none.
pub(crate) fn pick<'a, R: Rng + ?Sized>(
    candidates: &[&'a Endpoint],
    rng: &mut R,
) -> Option<&'a Endpoint> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            // Ties go to the first draw, which is itself random.
            Some(if b.load.in_flight() < a.load.in_flight() {
                b
            } else {
                a
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Load;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Arc;

    fn endpoint(name: &str, port: u16) -> Endpoint {
        Endpoint {
            instance: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            load: Arc::new(Load::default()),
        }
    }

    fn counts(candidates: &[&Endpoint], rounds: usize) -> HashMap<String, usize> {
        let mut rng = rand::rng();
        let mut counts = HashMap::new();
        for _ in 0..rounds {
            let Some(e) = pick(candidates, &mut rng) else {
                panic!("no pick from {} candidates", candidates.len());
            };
            *counts.entry(e.instance.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn none_and_one() {
        assert!(pick(&[], &mut rand::rng()).is_none());
        let only = endpoint("a", 1);
        assert_eq!(counts(&[&only], 10)["a"], 10);
    }

    #[test]
    fn of_two_the_less_loaded_always_wins() {
        let busy = endpoint("busy", 1);
        let idle = endpoint("idle", 2);
        let _guards: Vec<_> = (0..3).map(|_| busy.load.begin()).collect();
        let _one = idle.load.begin();
        let c = counts(&[&busy, &idle], 200);
        assert_eq!(c.get("idle"), Some(&200));
        assert_eq!(c.get("busy"), None);
    }

    #[test]
    fn the_most_loaded_of_many_is_never_picked_and_equal_load_spreads() {
        let es: Vec<Endpoint> = (0..4).map(|i| endpoint(&format!("e{i}"), i)).collect();
        let _guards: Vec<_> = (0..5).map(|_| es[3].load.begin()).collect();
        let refs: Vec<&Endpoint> = es.iter().collect();
        let c = counts(&refs, 3000);
        assert_eq!(c.get("e3"), None, "the busiest instance loses every draw");
        for name in ["e0", "e1", "e2"] {
            // Each idle instance is expected about 1000 times.
            assert!(c[name] > 700, "{name} picked {} times: {c:?}", c[name]);
        }
    }
}
