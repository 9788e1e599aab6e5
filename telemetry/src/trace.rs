//! Tracing setup and W3C trace-context propagation over bus headers.
//!
//! Every process logs with `tracing`; when an OTLP endpoint is configured, spans are also exported over
//! OTLP/HTTP. A message's trace context rides in the bus headers (`traceparent`), so one trace shows
//! gateway receive → bus → logic worker → seq → store write → delivery publish → gateway write.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

struct VecInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for VecInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

struct SliceExtractor<'a>(&'a [(String, String)]);

impl Extractor for SliceExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The trace-context headers of `span` (empty when it is not sampled or tracing is off).
pub fn inject(span: &Span) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut VecInjector(&mut headers));
    headers
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn set_parent(span: &Span, headers: &[(String, String)]) {
    let cx = TraceContextPropagator::new().extract(&SliceExtractor(headers));
    let _ = span.set_parent(cx);
}

/// Keeps the exporter alive; flushes pending spans when dropped.
#[derive(Debug, Default)]
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
}

/// How long the last flush of spans may take when the guard drops: a process exits within its grace
/// period (plus this), whatever the collector does (an unreachable one held the exit 5 s).
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(SHUTDOWN_FLUSH);
        }
    }
}

/// Installs the global subscriber: logs to stdout filtered by `filter`, plus OTLP/HTTP export of spans
/// to `otlp_endpoint` (e.g. `http://otel-collector:4318/v1/traces`) when given.
///
/// # Errors
/// When the exporter cannot be built or a subscriber is already installed.
pub fn init(
    service: &'static str,
    filter: EnvFilter,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<TraceGuard> {
    let fmt = tracing_subscriber::fmt::layer().with_filter(filter);
    let Some(endpoint) = otlp_endpoint else {
        Registry::default().with(fmt).try_init()?;
        return Ok(TraceGuard::default());
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    Registry::default().with(fmt).with(otel).try_init()?;
    Ok(TraceGuard {
        provider: Some(provider),
    })
}

/// Header map form, for tests and logs.
pub fn headers_map(headers: &[(String, String)]) -> HashMap<&str, &str> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    #[test]
    fn context_crosses_headers_as_parent_and_child() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = Registry::default()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let sender = tracing::info_span!("gateway_receive");
            let headers = sender.in_scope(|| inject(&sender));
            assert!(
                headers_map(&headers).contains_key("traceparent"),
                "{headers:?}"
            );
            drop(sender);
            // Another process: a fresh span adopts the remote parent.
            let receiver = tracing::info_span!("logic_handle");
            set_parent(&receiver, &headers);
            drop(receiver);
        });
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().expect("spans");
        let parent = spans
            .iter()
            .find(|s| s.name == "gateway_receive")
            .expect("parent span");
        let child = spans
            .iter()
            .find(|s| s.name == "logic_handle")
            .expect("child span");
        assert_eq!(
            child.span_context.trace_id(),
            parent.span_context.trace_id()
        );
        assert_eq!(child.parent_span_id, parent.span_context.span_id());
    }

    #[test]
    fn no_headers_no_parent() {
        let span = tracing::info_span!("x");
        set_parent(&span, &[]);
        assert!(
            inject(&span).is_empty(),
            "no subscriber: nothing to propagate"
        );
    }
}
