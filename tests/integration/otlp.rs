//! An OTLP/gRPC receiver in the test process (opentelemetry-proto's tonic
//! server types), decoding what credgate really exports.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    metrics::v1::Metric,
    resource::v1::Resource,
    trace::v1::Span,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// The resource attributes an export came with, and a span's or metric's name.
pub type Sighting = (HashMap<String, String>, String);

#[derive(Default, Clone)]
struct Store {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<Metric>>>,
    /// (resource attributes, span or metric name) of everything received.
    resources: Arc<Mutex<Vec<Sighting>>>,
}

impl Store {
    fn resource(&self, resource: Option<&Resource>, names: impl Iterator<Item = String>) {
        let attributes = resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
        let mut resources = self.resources.lock().expect("resources");
        resources.extend(names.map(|name| (attributes.clone(), name)));
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                self.resource(
                    resource.resource.as_ref(),
                    scope.spans.iter().map(|s| s.name.clone()),
                );
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut metrics = self.metrics.lock().expect("metrics");
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                self.resource(
                    resource.resource.as_ref(),
                    scope.metrics.iter().map(|m| m.name.clone()),
                );
                metrics.extend(scope.metrics);
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The receiver; it stops with the test's runtime.
pub struct Receiver {
    pub addr: SocketAddr,
    store: Store,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = Store::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .add_service(MetricsServiceServer::new(store.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Receiver { addr, store }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.spans.lock().expect("spans").clone()
    }

    pub fn metrics(&self) -> Vec<Metric> {
        self.store.metrics.lock().expect("metrics").clone()
    }

    /// (resource attributes, span or metric name) of everything received.
    pub fn resources(&self) -> Vec<Sighting> {
        self.store.resources.lock().expect("resources").clone()
    }

    /// Waits (bounded) until a span satisfies `pred`.
    pub async fn wait_for_span(&self, what: &str, pred: impl Fn(&Span) -> bool) -> Span {
        for _ in 0..200 {
            if let Some(span) = self.spans().into_iter().find(|s| pred(s)) {
                return span;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let names: Vec<_> = self.spans().into_iter().map(|s| s.name).collect();
        panic!("no exported span {what}; got {names:?}");
    }

    /// Waits (bounded) until a metric named `name` arrives.
    pub async fn wait_for_metric(&self, name: &str, pred: impl Fn(&Metric) -> bool) -> Metric {
        for _ in 0..200 {
            if let Some(m) = self
                .metrics()
                .into_iter()
                .find(|m| m.name == name && pred(m))
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let names: Vec<_> = self.metrics().into_iter().map(|m| m.name).collect();
        panic!("no metric {name}; got {names:?}");
    }
}

fn value_text(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Attributes as text, for assertions.
pub fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(value_text).unwrap_or_default(),
            )
        })
        .collect()
}

/// Every piece of text a span carries: name, attributes, events, status.
pub fn span_text(span: &Span) -> String {
    let mut text = format!("{} {:?}", span.name, attrs(&span.attributes));
    for event in &span.events {
        text.push_str(&format!(" {} {:?}", event.name, attrs(&event.attributes)));
    }
    if let Some(status) = &span.status {
        text.push_str(&status.message);
    }
    text
}

/// Every piece of text a metric carries: name, description and each data
/// point's attributes.
pub fn metric_text(metric: &Metric) -> String {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let mut text = format!("{} {}", metric.name, metric.description);
    let points: Vec<&[KeyValue]> = match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.iter().map(|p| &p.attributes[..]).collect(),
        Some(Data::Sum(s)) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
        Some(Data::Histogram(h)) => h.data_points.iter().map(|p| &p.attributes[..]).collect(),
        Some(Data::ExponentialHistogram(h)) => {
            h.data_points.iter().map(|p| &p.attributes[..]).collect()
        }
        Some(Data::Summary(s)) => s.data_points.iter().map(|p| &p.attributes[..]).collect(),
        None => Vec::new(),
    };
    for attributes in points {
        text.push_str(&format!(" {:?}", attrs(attributes)));
    }
    text
}
