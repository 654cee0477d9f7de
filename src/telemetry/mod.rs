//! Logs, traces and metrics: one init function and a guard that flushes.
//!
//! - Logs: one JSON object per line on stdout (or text), level from
//!   `RUST_LOG`, each line inside a span carrying `trace_id`/`span_id`.
//! - Traces and metrics: OTLP/gRPC, configured only by the standard `OTEL_*`
//!   variables. Without `OTEL_EXPORTER_OTLP_ENDPOINT` nothing is exported;
//!   spans are still created in-process so logs and audit records carry trace
//!   ids that a caller's own trace can be joined on.
//! - Each layer has its own filter: a global `RUST_LOG=warn` must not starve
//!   the exporter, and the exporter's own hyper/h2/tonic spans must never be
//!   exported (a telemetry loop).
//! - Audit events (`credgate::audit`) have a layer and filter of their own:
//!   they are written whatever `RUST_LOG` says, even `off`.

mod context;
pub(crate) mod logs;
mod metrics;

pub(crate) use context::{current_ids, extract_parent};
pub(crate) use logs::{AUDIT_REFUSED_EVENT, AUDIT_TARGET};
pub(crate) use metrics::{
    count_iam_outcome, metrics, observe_crl_expiry, observe_key_ages, observe_state_up,
};

use std::time::Duration;

use opentelemetry::{KeyValue, global, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, LevelFilter, Targets, dynamic_filter_fn, filter_fn},
    layer::{Filter, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::LogFormat;
use logs::{JsonLines, Output};

/// Flushes and stops the exporters when dropped.
pub(crate) struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: Option<SdkMeterProvider>,
    output: Output,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporters. Blocks: call it off
    /// the async workers (`spawn_blocking`) while the runtime still runs, as
    /// the tonic exporter needs the runtime to send.
    pub(crate) fn shutdown(&self) {
        if let Err(e) = self.tracer_provider.shutdown() {
            tracing::debug!(error = %e, "trace exporter shutdown");
        }
        if let Some(meters) = &self.meter_provider
            && let Err(e) = meters.shutdown()
        {
            tracing::debug!(error = %e, "metric exporter shutdown");
        }
        // What the exporters logged; the audit events were flushed before.
        self.flush_logs(Duration::from_secs(1));
    }

    /// Writes every buffered log line and audit event to stdout, waiting
    /// at most `within`; returns the bytes still unwritten.
    pub(crate) fn flush_logs(&self, within: Duration) -> usize {
        self.output.flush(within)
    }

    /// The log writer, whose stall the server acts on.
    pub(crate) fn output(&self) -> Output {
        self.output.clone()
    }
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TelemetryError {
    /// The OTLP exporter could not be built from the `OTEL_*` settings.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("logging: {0}")]
    Subscriber(String),
}

fn exporting() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// The process's resource: `service.name` and `service.instance.id` from
/// `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` when set there (the
/// Deployment puts the pod name in `service.instance.id` through the
/// downward API), else "credgate" and an id generated at start: replicas
/// must never export the same series, or a Prometheus exporter merges them.
fn resource(instance_id: &str) -> Resource {
    let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let has = |key: &str| {
        attributes
            .split(',')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    };
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() && !has("service.name") {
        builder = builder.with_service_name("credgate");
    }
    if !has("service.instance.id") {
        builder =
            builder.with_attribute(KeyValue::new("service.instance.id", instance_id.to_owned()));
    }
    builder.build()
}

/// Installs the global subscriber, propagator and (when configured) the OTLP
/// exporters. Must run inside the tokio runtime: the exporter's channel
/// spawns onto it.
pub(crate) fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let output = Output::stdout().map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    let (tracer_provider, meter_provider) = providers()?;
    let audit_filter = Targets::new().with_target(AUDIT_TARGET, LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(lines(format, &output).with_filter(log_filter()))
        .with(lines(format, &output).with_filter(audit_filter))
        .with(otel_layer(tracer_provider.tracer("credgate")))
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
        output,
    })
}

/// The global tracer provider, exporting over OTLP when configured, and the
/// meter provider when exporting. One instance id for both: spans and
/// metrics of this process join.
fn providers() -> Result<(SdkTracerProvider, Option<SdkMeterProvider>), TelemetryError> {
    let instance_id = uuid::Uuid::new_v4().to_string();
    let mut tracer_builder = SdkTracerProvider::builder().with_resource(resource(&instance_id));
    let mut meter_provider = None;
    if exporting() {
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        tracer_builder = tracer_builder.with_batch_exporter(spans);
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let meters = SdkMeterProvider::builder()
            .with_resource(resource(&instance_id))
            .with_periodic_exporter(metrics)
            .build();
        global::set_meter_provider(meters.clone());
        meter_provider = Some(meters);
    }
    let tracer_provider = tracer_builder.build();
    global::set_tracer_provider(tracer_provider.clone());
    Ok((tracer_provider, meter_provider))
}

/// What reaches the log lines: `RUST_LOG` (default `info`), without the
/// audit events (they have a layer of their own). The AWS SDK formats whole
/// requests and responses, bodies included (aws_sigv4 the signed request,
/// aws_smithy_runtime both, aws_runtime profile values), at trace level:
/// whatever RUST_LOG asks, every aws_* target stops at debug, so a body,
/// and the passwords in it, is never formatted.
fn log_filter<S>() -> impl Filter<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(|meta| meta.target() != AUDIT_TARGET))
        .and(filter_fn(|meta| {
            !(meta.target().starts_with("aws_") && *meta.level() > tracing::Level::DEBUG)
        }))
}

/// The OpenTelemetry layer: our spans; and, when traces are exported, the
/// AWS SDK's own spans (debug level) nested under the IAM span — never its
/// debug events, which cost more than the IAM call itself and say little.
/// Without an exporter the SDK's spans would only be built to be thrown
/// away. Everything else, notably the exporter's own transport, stays out.
fn otel_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let sdk_level = if exporting() {
        LevelFilter::DEBUG
    } else {
        LevelFilter::OFF
    };
    let otel_filter = Targets::new()
        .with_default(LevelFilter::OFF)
        .with_target("credgate", LevelFilter::INFO)
        .with_target("aws_sdk_iam", sdk_level)
        .with_target("aws_smithy_runtime", sdk_level)
        .and(filter_fn(|meta| {
            meta.is_span() || meta.target().starts_with("credgate")
        }));
    // Only RPC server spans start a trace. Everything else (IAM client,
    // SDK, state store spans) is exported inside an RPC's trace, never as a
    // trace of its own: background work (profile verification) stays out.
    let in_a_trace = dynamic_filter_fn(|meta, cx| {
        !meta.is_span() || meta.name() == "rpc" || cx.lookup_current().is_some()
    });
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter.and(in_a_trace))
}

/// A layer writing log lines in `format` to `output`.
fn lines<S>(format: LogFormat, output: &Output) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(output.clone())
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(output.clone())
            .boxed(),
    }
}
