//! How a test that cannot run here says so: one rule for every crate's
//! tests. A crate of its own, with no dependencies, because the broker's,
//! gateway's and runtime's tests cannot use `flotilla-testkit` (it depends
//! on them), and the rule written once per crate drifted.

/// The variable that turns every skip into a failure: `.ci/run` sets it,
/// so a machine that lacks what a test needs fails the run instead of
/// passing it with the test quietly not run.
pub const REQUIRE_ALL_ENV: &str = "FLOTILLA_TEST_REQUIRE_ALL";

/// Whether tests may not skip: [`REQUIRE_ALL_ENV`] is set, not empty and
/// not `0`.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Where a test cannot run here (`missing`, e.g. "no chromium on this
/// machine") and returns without checking anything: prints
/// `skipped: {missing} ({provide})`, or, when [`require_all`], panics with
/// both, since a passing test's output is not shown and the skip would go
/// unseen.
#[track_caller]
pub fn skip(missing: &str, provide: &str) {
    if require_all() {
        panic!(
            "cannot run: {missing}; {provide} ({REQUIRE_ALL_ENV} is set, so this test may not skip)"
        );
    }
    println!("skipped: {missing} ({provide})");
}

/// `var`'s value, or `None` (after [`skip`]) when it is unset or empty.
#[track_caller]
pub fn env_or_skip(var: &str, provide: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            skip(&format!("{var} is not set"), provide);
            None
        }
    }
}
