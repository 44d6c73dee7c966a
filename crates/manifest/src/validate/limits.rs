//! Validation of the gateway's tuning tables: `[gateway.limits]`,
//! `[gateway.retries]` and `[gateway.outlier_detection]`. Each value is
//! bounded to what makes sense for one gateway, so a typo (`max_in_flight =
//! 0`, `header_timeout = "10h"`) is caught by `flotilla check`, not found in
//! production.

use std::time::Duration;

use toml::Spanned;

use super::Ctx;
use crate::edge::{GatewayLimits, OutlierDetection, Retries};
use crate::raw::{RawLimits, RawOutlier, RawRetries};

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

pub(super) fn limits(ctx: &mut Ctx<'_>, raw: &Spanned<RawLimits>) -> Option<GatewayLimits> {
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let limits = GatewayLimits {
        max_in_flight: count(ctx, &raw.max_in_flight, "max_in_flight", 1, 1_000_000),
        max_connections: count(ctx, &raw.max_connections, "max_connections", 1, 1_000_000),
        max_connections_per_ip: count(
            ctx,
            &raw.max_connections_per_ip,
            "max_connections_per_ip",
            1,
            1_000_000,
        ),
        max_connection_requests: count(
            ctx,
            &raw.max_connection_requests,
            "max_connection_requests",
            1,
            10_000_000,
        ),
        max_connection_age: duration(
            ctx,
            &raw.max_connection_age,
            "max_connection_age",
            SECOND,
            DAY,
        ),
        max_body_bytes: raw
            .max_body_bytes
            .as_ref()
            .and_then(|v| super::edge::max_body(ctx, v)),
        max_header_bytes: count(
            ctx,
            &raw.max_header_bytes,
            "max_header_bytes",
            8192,
            1 << 20,
        ),
        max_headers: count(ctx, &raw.max_headers, "max_headers", 1, 1000),
        header_timeout: duration(
            ctx,
            &raw.header_timeout,
            "header_timeout",
            SECOND,
            5 * MINUTE,
        ),
        idle_timeout: duration(ctx, &raw.idle_timeout, "idle_timeout", SECOND, HOUR),
        body_timeout: duration(ctx, &raw.body_timeout, "body_timeout", SECOND, HOUR),
        connect_timeout: duration(
            ctx,
            &raw.connect_timeout,
            "connect_timeout",
            Duration::from_millis(100),
            MINUTE,
        ),
        max_websockets: count(ctx, &raw.max_websockets, "max_websockets", 1, 1_000_000),
        websocket_idle_timeout: duration(
            ctx,
            &raw.websocket_idle_timeout,
            "websocket_idle_timeout",
            SECOND,
            DAY,
        ),
        workers: count(ctx, &raw.workers, "workers", 1, 1024),
    };
    (ctx.errors.len() == before).then_some(limits)
}

pub(super) fn retries(ctx: &mut Ctx<'_>, raw: &Spanned<RawRetries>) -> Option<Retries> {
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let retries = Retries {
        attempts: count(ctx, &raw.attempts, "attempts", 0, 10),
        budget_percent: count(ctx, &raw.budget_percent, "budget_percent", 0, 100),
        min_per_second: count(ctx, &raw.min_per_second, "min_per_second", 0, 10_000),
    };
    (ctx.errors.len() == before).then_some(retries)
}

pub(super) fn outlier_detection(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<RawOutlier>,
) -> Option<OutlierDetection> {
    let span = raw.span();
    let raw = raw.get_ref();
    let before = ctx.errors.len();
    let outlier = OutlierDetection {
        consecutive_failures: count(
            ctx,
            &raw.consecutive_failures,
            "consecutive_failures",
            1,
            1000,
        ),
        base_ejection: duration(ctx, &raw.base_ejection, "base_ejection", SECOND, HOUR),
        max_ejection: duration(ctx, &raw.max_ejection, "max_ejection", SECOND, DAY),
    };
    // Compare what will be used, defaults included.
    let base = outlier
        .base_ejection
        .unwrap_or(OutlierDetection::DEFAULT_BASE_EJECTION);
    let max = outlier
        .max_ejection
        .unwrap_or(OutlierDetection::DEFAULT_MAX_EJECTION);
    if ctx.errors.len() == before && max < base {
        let at = raw
            .max_ejection
            .as_ref()
            .or(raw.base_ejection.as_ref())
            .map_or(span, |v| v.span());
        ctx.error(
            at,
            format!(
                "`max_ejection` ({}) is shorter than `base_ejection` ({})",
                humantime::format_duration(max),
                humantime::format_duration(base)
            ),
            Some(format!(
                "make `max_ejection` at least `base_ejection` (defaults: {} and {})",
                humantime::format_duration(OutlierDetection::DEFAULT_BASE_EJECTION),
                humantime::format_duration(OutlierDetection::DEFAULT_MAX_EJECTION)
            )),
        );
    }
    (ctx.errors.len() == before).then_some(outlier)
}

/// An optional whole number within `min..=max`.
fn count(
    ctx: &mut Ctx<'_>,
    raw: &Option<Spanned<i64>>,
    key: &str,
    min: i64,
    max: i64,
) -> Option<u32> {
    ctx.count(raw.as_ref()?, key, min, max)
}

/// An optional duration within `min..=max`.
fn duration(
    ctx: &mut Ctx<'_>,
    raw: &Option<Spanned<String>>,
    key: &str,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    let range = format!(
        "{} to {}",
        humantime::format_duration(min),
        humantime::format_duration(max)
    );
    ctx.duration_in(raw.as_ref()?, key, (min, max), &range)
}
