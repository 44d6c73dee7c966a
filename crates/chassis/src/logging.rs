//! JSON-lines logging to stdout, one object per event, each carrying the
//! service and instance so the runtime's log capture and the console can
//! attribute lines without parsing file names.
//!
//! A hand-written formatter rather than tracing-subscriber's `json()`
//! because that one cannot add constant fields to every line.

use std::fmt;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::error_chain;

static INIT: OnceLock<()> = OnceLock::new();

/// Installs the JSON-lines subscriber on stdout, filtered by `RUST_LOG`
/// (default `info`). Idempotent: later calls, and calls after another
/// subscriber was installed (as in tests), do nothing.
///
/// Reads `FLOTILLA_SERVICE`, `FLOTILLA_INSTANCE`, `FLOTILLA_SYSTEM` and
/// `OTEL_SERVICE_NAME` from the process environment for the constant fields.
/// [`crate::Service::from_env`] calls it; call it yourself first if you want
/// errors from `from_env` itself as JSON lines.
pub fn init_logging() {
    INIT.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let service = var("FLOTILLA_SERVICE").or_else(|| var("OTEL_SERVICE_NAME"));
        let instance = var("FLOTILLA_INSTANCE");
        let system = var("FLOTILLA_SYSTEM");
        let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
            Ok(filter) => (filter, None),
            Err(e) => (
                EnvFilter::new("info"),
                std::env::var("RUST_LOG").ok().map(|v| (v, e.to_string())),
            ),
        };
        let format = JsonLines {
            service,
            instance,
            system,
        };
        let installed = tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(format)
                    .with_writer(std::io::stdout),
            )
            .try_init()
            .is_ok();
        if let (true, Some((value, reason))) = (installed, bad_filter) {
            tracing::warn!(
                rust_log = %value,
                reason = %reason,
                "RUST_LOG is invalid, logging at info; use e.g. RUST_LOG=info,sqlx=warn"
            );
        }
    });
}

/// The event formatter: `timestamp`, `level`, `target`, `message`, the
/// event's fields, the innermost span's name, the constant identity
/// fields, and, for a line logged while a request is handled, its
/// `request_id` and `trace_id`.
struct JsonLines {
    service: Option<String>,
    instance: Option<String>,
    system: Option<String>,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut map = Map::new();
        map.insert("timestamp".into(), format_rfc3339(SystemTime::now()).into());
        map.insert("level".into(), meta.level().as_str().into());
        map.insert("target".into(), meta.target().into());
        for (key, value) in [
            ("service", &self.service),
            ("instance", &self.instance),
            ("system", &self.system),
        ] {
            if let Some(value) = value {
                map.insert(key.into(), value.as_str().into());
            }
        }
        if let Some(span) = ctx.lookup_current() {
            map.insert("span".into(), span.name().into());
        }
        // The request being handled on this task (the metrics middleware
        // scopes both): its lines join the gateway's access-log line and
        // the other services' lines of the same request and trace.
        if let Some(id) = crate::request_id::current() {
            map.insert("request_id".into(), id.into());
        }
        if let Some(trace_id) = crate::trace::current_trace_id() {
            map.insert("trace_id".into(), trace_id.into());
        }
        event.record(&mut JsonVisitor(&mut map));
        let line = serde_json::to_string(&map).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), error_chain(value).into());
    }
}

/// A service binary's `main`: installs the JSON logging
/// ([`init_logging`]), runs `run` to the end and turns its result into the
/// exit code, logging an error with its whole chain ([`error_chain`]) as
/// `"<name> stopped"`.
///
/// ```no_run
/// use std::process::ExitCode;
///
/// #[tokio::main]
/// async fn main() -> ExitCode {
///     flotilla_chassis::run_main("shop-hello", run()).await
/// }
///
/// async fn run() -> Result<(), flotilla_chassis::Error> {
///     let service = flotilla_chassis::Service::from_env()?;
///     service.serve(axum::Router::new()).await
/// }
/// ```
pub async fn run_main<E>(name: &str, run: impl Future<Output = Result<(), E>>) -> ExitCode
where
    E: std::error::Error + 'static,
{
    init_logging();
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "{name} stopped");
            ExitCode::FAILURE
        }
    }
}

/// The current time as RFC 3339 UTC with milliseconds,
/// e.g. `2025-01-31T12:00:00.123Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now())
}

/// Formats `t` as RFC 3339 UTC with milliseconds; times before 1970 are
/// clamped to the epoch (nothing the platform records predates it).
pub fn format_rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, unsigned because the input
/// is never before the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, millis: u64) -> String {
        format_rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
    }

    /// Lines of a handler's work carry the request's id and trace id;
    /// lines outside one carry neither.
    #[tokio::test]
    async fn lines_logged_while_handling_a_request_carry_its_ids() {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let written = lines.clone();
        let format = JsonLines {
            service: Some("orders".into()),
            instance: None,
            system: None,
        };
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(format)
                .with_writer(move || written.clone()),
        );
        let _default = tracing::subscriber::set_default(subscriber);
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        crate::request_id::scope(
            Some("req-7".into()),
            crate::trace::scope(Some(traceparent.into()), async {
                tracing::info!(order = 42, "order placed");
            }),
        )
        .await;
        tracing::info!("between requests");

        let text = String::from_utf8(lines.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        let parsed: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        assert_eq!(parsed[0]["message"], "order placed");
        assert_eq!(parsed[0]["order"], 42);
        assert_eq!(parsed[0]["service"], "orders");
        assert_eq!(parsed[0]["request_id"], "req-7");
        assert_eq!(parsed[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed[1]["message"], "between requests");
        assert!(parsed[1].get("request_id").is_none(), "{text}");
        assert!(parsed[1].get("trace_id").is_none(), "{text}");
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
