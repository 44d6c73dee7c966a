//! Choosing an instance: power of two choices over in-flight requests.
//!
//! Two distinct instances are drawn at random and the one with fewer
//! requests in flight wins. This avoids both the herd behaviour of "always
//! the least loaded" (every gateway replica piling onto the same instance
//! between load updates) and the blindness of round robin to slow
//! instances, at the cost of two atomic loads.

use rand::Rng;

use crate::affinity;
use crate::upstream::Endpoint;

/// Picks one of the `endpoints` that are a `candidate`, as its index;
/// `None` only when there are none. The candidates are counted and found
/// in place rather than collected: the pick runs on every request.
pub(crate) fn pick<R: Rng + ?Sized>(
    endpoints: &[Endpoint],
    candidate: impl Fn(&Endpoint) -> bool,
    rng: &mut R,
) -> Option<usize> {
    let nth = |n: usize| {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| candidate(e))
            .nth(n)
    };
    match endpoints.iter().filter(|e| candidate(e)).count() {
        0 => None,
        1 => nth(0).map(|(i, _)| i),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let ((a, ea), (b, eb)) = (nth(a)?, nth(b)?);
            // Ties go to the first draw, which is itself random.
            Some(if eb.load.in_flight() < ea.load.in_flight() {
                b
            } else {
                a
            })
        }
    }
}

/// Picks, of the `endpoints` that are a `candidate`, the one the key
/// hashed to `key` goes to (see `affinity`): the highest score wins, so
/// a key keeps its instance while that instance is a candidate, and
/// otherwise moves to the same next one from every gateway.
pub(crate) fn pick_sticky(
    endpoints: &[Endpoint],
    candidate: impl Fn(&Endpoint) -> bool,
    key: u64,
) -> Option<usize> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| candidate(e))
        .max_by_key(|(_, e)| affinity::score(key, &e.instance))
        .map(|(i, _)| i)
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

    fn counts(
        endpoints: &[Endpoint],
        candidate: impl Fn(&Endpoint) -> bool,
        rounds: usize,
    ) -> HashMap<String, usize> {
        let mut rng = rand::rng();
        let mut counts = HashMap::new();
        for _ in 0..rounds {
            let Some(e) = pick(endpoints, &candidate, &mut rng).and_then(|i| endpoints.get(i))
            else {
                panic!("no pick from {} endpoints", endpoints.len());
            };
            *counts.entry(e.instance.clone()).or_insert(0) += 1;
        }
        counts
    }

    fn all(_: &Endpoint) -> bool {
        true
    }

    #[test]
    fn none_and_one() {
        assert!(pick(&[], all, &mut rand::rng()).is_none());
        let es = [endpoint("a", 1), endpoint("b", 2)];
        assert!(pick(&es, |_| false, &mut rand::rng()).is_none());
        assert_eq!(counts(&es[..1], all, 10)["a"], 10);
        let c = counts(&es, |e| e.instance == "b", 10);
        assert_eq!(c.get("b"), Some(&10));
    }

    #[test]
    fn of_two_the_less_loaded_always_wins() {
        let busy = endpoint("busy", 1);
        let idle = endpoint("idle", 2);
        let _guards: Vec<_> = (0..3).map(|_| busy.load.begin()).collect();
        let _one = idle.load.begin();
        let c = counts(&[busy, idle], all, 200);
        assert_eq!(c.get("idle"), Some(&200));
        assert_eq!(c.get("busy"), None);
    }

    #[test]
    fn the_most_loaded_of_many_is_never_picked_and_equal_load_spreads() {
        let es: Vec<Endpoint> = (0..4).map(|i| endpoint(&format!("e{i}"), i)).collect();
        let _guards: Vec<_> = (0..5).map(|_| es[3].load.begin()).collect();
        let c = counts(&es, all, 3000);
        assert_eq!(c.get("e3"), None, "the busiest instance loses every draw");
        for name in ["e0", "e1", "e2"] {
            // Each idle instance is expected about 1000 times.
            assert!(c[name] > 700, "{name} picked {} times: {c:?}", c[name]);
        }
    }

    #[test]
    fn a_key_keeps_its_instance_whatever_the_load_and_order() {
        let es: Vec<Endpoint> = (0..4).map(|i| endpoint(&format!("e{i}"), i)).collect();
        let first = pick_sticky(&es, all, 42).unwrap();
        // Loaded or listed in another order, the same instance.
        let _guards: Vec<_> = (0..5).map(|_| es[first].load.begin()).collect();
        let mut reversed = es.clone();
        reversed.reverse();
        let again = pick_sticky(&reversed, all, 42).unwrap();
        assert_eq!(reversed[again].instance, es[first].instance);
        // Not a candidate (ejected, tried): the next choice, the same one
        // each time; and none without candidates.
        let skip = |e: &Endpoint| e.instance != es[first].instance;
        let next = pick_sticky(&es, skip, 42).unwrap();
        assert_ne!(next, first);
        assert_eq!(pick_sticky(&es, skip, 42), Some(next));
        assert_eq!(pick_sticky(&es, |_| false, 42), None);
    }

    #[test]
    fn only_candidates_are_picked() {
        let es: Vec<Endpoint> = (0..5).map(|i| endpoint(&format!("e{i}"), i)).collect();
        let c = counts(&es, |e| e.instance == "e1" || e.instance == "e3", 400);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c["e1"] > 100 && c["e3"] > 100, "{c:?}");
    }
}
