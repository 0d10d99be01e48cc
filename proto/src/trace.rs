//! One send is one trace across processes. The router's span of a call and the cell's span
//! of its handling are parent and child: the W3C trace context (`traceparent`) of the
//! router's span travels in the gRPC metadata of the call it forwards, and the cell makes
//! its span a child of what it finds there. A message the cell queues carries its
//! `traceparent` too, so its later delivery joins the same trace.
//!
//! All of this is work only while this process exports spans: [`exporting`] says whether
//! [`crate::server::init_tracing`] installed the OpenTelemetry layer. Without it the
//! callers make no spans of their own (`Span::none()`), and nothing here injects, extracts
//! or formats anything, so a router without an OTLP endpoint pays one atomic load per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header (and metadata key) of a trace context.
pub const TRACEPARENT: &str = "traceparent";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports its spans (an OTLP endpoint is configured and the layer
/// that sends them is installed).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Called once the subscriber with the OpenTelemetry layer is the global one.
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// tonic's metadata as a place to write a trace context (ASCII keys and values only, as
/// the W3C fields are).
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// tonic's metadata as a place to read a trace context from.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes the context of the current span into `metadata`, for the callee to continue the
/// trace. Nothing when not exporting.
pub fn inject_current(metadata: &mut MetadataMap) {
    if !exporting() {
        return;
    }
    let cx = Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the trace context in `metadata`, if the caller sent a valid one
/// (else `span` keeps the parent it has). Call before `span` is first entered.
pub fn continue_from_metadata(span: &Span, metadata: &MetadataMap) {
    if exporting() {
        continue_from(span, &MetadataExtractor(metadata));
    }
}

/// The `traceparent` of `span`, to store with work that goes on later (a queued message).
/// None when not exporting or `span` is not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    if !exporting() || span.is_disabled() {
        return None;
    }
    let mut fields = HashMap::with_capacity(1);
    TraceContextPropagator::new().inject_context(&span.context(), &mut fields);
    fields.remove(TRACEPARENT)
}

/// Makes `span` a child of the span whose [`traceparent`] this is, if it is a valid one.
pub fn continue_from_traceparent(span: &Span, traceparent: &str) {
    if exporting() {
        let fields = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
        continue_from(span, &fields);
    }
}

fn continue_from(span: &Span, fields: &dyn Extractor) {
    let parent = TraceContextPropagator::new().extract(fields);
    if parent.span().span_context().is_valid() {
        // Fails only for a span that is disabled or already started: it stays as it is.
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_trace_context_goes_through_grpc_metadata_unchanged() {
        let parent = TraceContextPropagator::new().extract(&HashMap::from([(
            TRACEPARENT.to_owned(),
            PARENT.to_owned(),
        )]));
        let mut metadata = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&parent, &mut MetadataInjector(&mut metadata));
        assert_eq!(
            metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some(PARENT)
        );
        let back = TraceContextPropagator::new().extract(&MetadataExtractor(&metadata));
        assert_eq!(
            back.span().span_context(),
            parent.span().span_context(),
            "{metadata:?}"
        );
    }

    #[test]
    fn metadata_without_a_trace_context_gives_none() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "1S".parse().unwrap());
        metadata.insert(TRACEPARENT, "garbage".parse().unwrap());
        let cx = TraceContextPropagator::new().extract(&MetadataExtractor(&metadata));
        assert!(!cx.span().span_context().is_valid());
    }

    #[test]
    fn nothing_is_injected_while_spans_are_not_exported() {
        // No test here installs the layer, so this process does not export.
        assert!(!exporting());
        let mut metadata = MetadataMap::new();
        inject_current(&mut metadata);
        assert!(metadata.is_empty());
        assert_eq!(traceparent(&Span::none()), None);
    }
}
