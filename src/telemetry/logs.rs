//! Log lines: the JSON line format and the writer they go through.
//!
//! - [`JsonLines`] writes each event as one JSON object straight into the
//!   line buffer: no intermediate map, value or string per field.
//! - [`Output`] takes whole lines without a system call, a wake-up or ever
//!   a wait: they are appended to a bounded buffer that a writer thread
//!   looks at every few milliseconds and writes to stdout. No runtime thread
//!   ever waits for stdout, so a stalled stdout (a full pipe nobody reads)
//!   cannot stop health probes or any call. While it stalls, the buffer
//!   fills: ordinary log lines beyond [`LOG_CAP`] are dropped and counted;
//!   audit events are kept up to [`AUDIT_CAP`] (far more than the attempts
//!   that can be in flight), and [`Output::stalled`] tells the server to
//!   refuse new attempts before IAM and to report NOT_SERVING, so the audit
//!   events that must be written stay few. [`Output::flush`] writes
//!   everything out (at exit), within a budget.

use std::{
    fmt::{self, Write as _},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tracing::{Metadata, Subscriber, field::Field};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter, format::Writer},
    registry::LookupSpan,
};

use super::context::with_current_ids;

/// The target of audit events: they have a subscriber filter of their own
/// (written whatever `RUST_LOG` says), and this writer keeps them longest.
pub(crate) const AUDIT_TARGET: &str = "credgate::audit";

/// Event name of the audit events of calls refused with AUDIT_UNAVAILABLE:
/// this writer keeps those only while it has room.
pub(crate) const AUDIT_REFUSED_EVENT: &str = "audit_unavailable";

/// How long lines collect before the writer thread writes them out.
const BATCH: Duration = Duration::from_millis(5);
/// How long the sink may accept no bytes while lines wait before it counts
/// as stalled (DESIGN.md, "Audit").
pub(crate) const STALL: Duration = Duration::from_secs(1);
/// Buffered bytes beyond which ordinary log lines are dropped: seconds of
/// output at full load, so a sink that only hiccups loses nothing.
const LOG_CAP: usize = 4 * 1024 * 1024;
/// Buffered bytes beyond which even audit events are dropped (and counted):
/// tens of thousands of events, while at most the attempts in flight when
/// the sink stalled still produce one each.
const AUDIT_CAP: usize = 32 * 1024 * 1024;
/// Bytes per write(2): at most PIPE_BUF, so that each write into a pipe is
/// atomic and returns as soon as the reader made room for it; progress is
/// then visible within a write, not only after a whole batch.
const CHUNK: usize = 4096;
/// Spare capacity the writer keeps between batches.
const KEEP: usize = 256 * 1024;

/// What a line is, which decides what happens to it while stdout stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// An ordinary log line: dropped beyond [`LOG_CAP`].
    Log,
    /// The audit event of an attempt: kept up to [`AUDIT_CAP`].
    Audit,
    /// The audit event of a call refused with AUDIT_UNAVAILABLE: such
    /// events arrive at the request rate while the sink stalls, so they are
    /// kept only like log lines, and counted when dropped.
    Refusal,
}

/// Lines dropped because the buffer was full, by class, and bytes that the
/// sink refused for good (a closed stdout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Ordinary log lines.
    pub(crate) logs: u64,
    /// Audit events of calls refused with AUDIT_UNAVAILABLE.
    pub(crate) refusals: u64,
    /// Audit events of attempts (beyond [`AUDIT_CAP`]).
    pub(crate) audit: u64,
    /// Bytes written into a sink that failed (EPIPE, EIO).
    pub(crate) unwritable_bytes: u64,
}

impl Dropped {
    /// Whether anything was dropped.
    pub(crate) fn any(&self) -> bool {
        *self != Self::default()
    }
}

struct Buffer {
    bytes: Vec<u8>,
    /// Bytes the writer took out of `bytes` and has not written yet.
    in_flight: usize,
    /// Since when the waiting bytes have waited with no write progress: the
    /// last progress, or the moment lines started waiting.
    since: Instant,
    /// The last write failed for good: nothing reaches the sink.
    broken: bool,
    dropped: Dropped,
}

impl Buffer {
    fn pending(&self) -> usize {
        self.bytes.len() + self.in_flight
    }
}

struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when a flush is asked.
    work: Condvar,
    /// Signalled after each batch is written out.
    done: Condvar,
    log_cap: usize,
    audit_cap: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // Appending bytes cannot leave the buffer inconsistent mid-panic.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The line writer: cheap to clone, one writer thread behind all clones.
#[derive(Clone)]
pub(crate) struct Output {
    shared: Arc<Shared>,
}

impl Output {
    /// Starts the writer thread for stdout. It writes to its own handle on
    /// the stdout file descriptor, past std's line buffer, so that every
    /// write(2) it makes is one it can observe completing.
    pub(crate) fn stdout() -> std::io::Result<Self> {
        use std::os::fd::AsFd as _;
        let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
        Self::new(std::fs::File::from(fd), LOG_CAP, AUDIT_CAP)
    }

    fn new(
        sink: impl std::io::Write + Send + 'static,
        log_cap: usize,
        audit_cap: usize,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                bytes: Vec::new(),
                in_flight: 0,
                since: Instant::now(),
                broken: false,
                dropped: Dropped::default(),
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            log_cap,
            audit_cap,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("credgate-logs".to_owned())
            .spawn(move || write_out(&writer, sink))?;
        Ok(Self { shared })
    }

    /// Waits, at most `within`, until every line appended so far has been
    /// written; returns the bytes still unwritten (0: all out).
    pub(crate) fn flush(&self, within: Duration) -> usize {
        let until = Instant::now() + within;
        let mut buffer = self.shared.lock();
        self.shared.work.notify_one();
        while buffer.pending() > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return buffer.pending();
            }
            buffer = self
                .shared
                .done
                .wait_timeout(buffer, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        0
    }

    /// Whether the sink has accepted no bytes for [`STALL`] while lines
    /// wait, or failed for good: an audit event queued now would only sit
    /// in memory.
    pub(crate) fn stalled(&self) -> bool {
        let buffer = self.shared.lock();
        buffer.broken || (buffer.pending() > 0 && buffer.since.elapsed() >= STALL)
    }

    /// What was dropped since the last call.
    pub(crate) fn take_dropped(&self) -> Dropped {
        std::mem::take(&mut self.shared.lock().dropped)
    }

    /// Appends one whole line; never waits.
    fn append(&self, line: &[u8], class: Class) {
        let mut buffer = self.shared.lock();
        let pending = buffer.pending();
        let cap = match class {
            Class::Audit => self.shared.audit_cap,
            Class::Log | Class::Refusal => self.shared.log_cap,
        };
        // An empty buffer takes any line, however long.
        if pending > 0 && pending + line.len() > cap {
            let counter = match class {
                Class::Log => &mut buffer.dropped.logs,
                Class::Refusal => &mut buffer.dropped.refusals,
                Class::Audit => &mut buffer.dropped.audit,
            };
            *counter += 1;
            return;
        }
        if pending == 0 {
            buffer.since = Instant::now();
        }
        // No wake-up: the writer comes by within BATCH anyway.
        buffer.bytes.extend_from_slice(line);
    }
}

/// The writer thread: every BATCH (or at once when asked), writes out what
/// has gathered, in [`CHUNK`]s, noting progress after each. Polling on a
/// timer costs it a few microseconds per BATCH when idle, and saves every
/// log line a wake-up of this thread.
fn write_out(shared: &Shared, mut sink: impl std::io::Write) {
    let mut batch = Vec::new();
    loop {
        {
            let mut buffer = shared.lock();
            while buffer.bytes.is_empty() {
                buffer = shared
                    .work
                    .wait_timeout(buffer, BATCH)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut buffer.bytes, &mut batch);
            buffer.in_flight = batch.len();
        }
        for chunk in batch.chunks(CHUNK) {
            let written = write_chunk(&mut sink, chunk);
            let mut buffer = shared.lock();
            buffer.in_flight -= chunk.len();
            buffer.since = Instant::now();
            buffer.broken = !written;
            if !written {
                buffer.dropped.unwritable_bytes += chunk.len() as u64;
            }
        }
        let _ = sink.flush();
        batch.clear();
        // A batch after a long stall can be tens of MiB: do not keep that.
        batch.shrink_to(KEEP);
        shared.done.notify_all();
    }
}

/// Writes `chunk` whole; false when the sink fails for good.
fn write_chunk(sink: &mut impl std::io::Write, mut chunk: &[u8]) -> bool {
    while !chunk.is_empty() {
        match sink.write(chunk) {
            Ok(0) => return false,
            Ok(n) => chunk = &chunk[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Someone made the shared descriptor non-blocking: wait as a
            // blocking write would.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return false,
        }
    }
    true
}

/// One line in the making; appended to the buffer whole, when dropped.
pub(crate) struct Line {
    output: Output,
    class: Class,
    bytes: Vec<u8>,
}

impl std::io::Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.bytes.is_empty() {
            self.output.append(&self.bytes, self.class);
        }
    }
}

impl<'a> MakeWriter<'a> for Output {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        self.line(Class::Log)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        let class = if meta.target() != AUDIT_TARGET {
            Class::Log
        } else if meta.name() == AUDIT_REFUSED_EVENT {
            Class::Refusal
        } else {
            Class::Audit
        };
        self.line(class)
    }
}

impl Output {
    fn line(&self, class: Class) -> Line {
        Line {
            output: self.clone(),
            class,
            bytes: Vec::new(),
        }
    }
}

/// One JSON object per line: timestamp, level, target, the event's fields
/// flattened, the current span's name, and its trace/span ids.
pub(crate) struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"target\":",
            humantime::format_rfc3339_micros(SystemTime::now()),
            meta.level()
        )?;
        json_string(&mut writer, meta.target())?;
        let mut fields = JsonFields {
            writer: &mut writer,
            result: Ok(()),
            has_trace_id: false,
        };
        event.record(&mut fields);
        let (result, has_trace_id) = (fields.result, fields.has_trace_id);
        result?;
        if let Some(span) = ctx.lookup_current() {
            writer.write_str(",\"span\":")?;
            json_string(&mut writer, span.name())?;
        }
        // From the dispatcher's current span, not this layer's view of it:
        // the audit layer's filter sees no spans, yet its events belong to
        // the call's trace.
        with_current_ids(|trace_id, span_id| {
            if !has_trace_id {
                write!(writer, ",\"trace_id\":\"{trace_id}\"")?;
            }
            write!(writer, ",\"span_id\":\"{span_id}\"")
        })
        .unwrap_or(Ok(()))?;
        writer.write_str("}\n")
    }
}

struct JsonFields<'w, 'a> {
    writer: &'w mut Writer<'a>,
    result: fmt::Result,
    /// The event names its trace itself (audit events do).
    has_trace_id: bool,
}

impl JsonFields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "trace_id" {
            self.has_trace_id = true;
        }
        self.result = (|| {
            self.writer.write_char(',')?;
            json_string(self.writer, field.name())?;
            self.writer.write_char(':')?;
            value(self.writer)
        })();
    }
}

impl tracing::field::Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| json_string(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |w| write!(w, "{value}"));
        } else {
            self.field(field, |w| write!(w, "\"{value}\""));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// Writes `text` as a JSON string literal.
fn json_string(w: &mut impl fmt::Write, text: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(text)?;
    w.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaped<'w, W: fmt::Write>(&'w mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in text.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&text[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}é").expect("write");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
        let parsed: String = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é");
    }

    /// A sink whose writes block while `open` is false, like a pipe
    /// nobody reads, recording what it accepted.
    #[derive(Clone, Default)]
    struct Valve {
        state: Arc<(Mutex<ValveState>, Condvar)>,
    }

    /// Open or not, and what went through.
    type ValveState = (bool, Vec<u8>);

    impl Valve {
        fn set_open(&self, open: bool) {
            self.state.0.lock().expect("valve").0 = open;
            self.state.1.notify_all();
        }

        fn written(&self) -> String {
            String::from_utf8(self.state.0.lock().expect("valve").1.clone()).expect("utf-8")
        }
    }

    impl std::io::Write for Valve {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let (lock, cvar) = &*self.state;
            let mut state = lock.lock().expect("valve");
            while !state.0 {
                state = cvar.wait(state).expect("valve");
            }
            state.1.extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn append(output: &Output, class: Class, text: &str) {
        let mut line = output.line(class);
        std::io::Write::write_all(&mut line, text.as_bytes()).expect("append");
    }

    #[test]
    fn every_line_written_before_a_flush_is_out_after_it() {
        let valve = Valve::default();
        valve.set_open(true);
        let output = Output::new(valve.clone(), LOG_CAP, AUDIT_CAP).expect("writer thread");
        for i in 0..1000 {
            append(&output, Class::Log, &format!("line {i}\n"));
        }
        assert_eq!(output.flush(Duration::from_secs(10)), 0);
        assert_eq!(valve.written().lines().count(), 1000);
        assert!(!output.stalled());
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_logger_drops_log_lines_and_keeps_audit_events() {
        let valve = Valve::default();
        let output = Output::new(valve.clone(), 1024, 64 * 1024).expect("writer thread");
        let started = Instant::now();
        for i in 0..200 {
            append(
                &output,
                Class::Log,
                &format!("log {i:04} {}\n", "x".repeat(40)),
            );
            append(&output, Class::Audit, &format!("audit {i:04}\n"));
            append(
                &output,
                Class::Refusal,
                &format!("refusal {i:04} {}\n", "y".repeat(40)),
            );
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "appending never waits for the sink: {:?}",
            started.elapsed()
        );
        assert!(!output.stalled(), "waiting less than STALL is no stall yet");
        std::thread::sleep(STALL + Duration::from_millis(200));
        assert!(output.stalled());
        assert!(
            output.flush(Duration::from_millis(50)) > 0,
            "a flush gives up in time"
        );

        valve.set_open(true);
        assert_eq!(output.flush(Duration::from_secs(10)), 0);
        assert!(
            !output.stalled(),
            "recovered once the sink takes bytes again"
        );
        let written = valve.written();
        for i in 0..200 {
            assert!(
                written.contains(&format!("audit {i:04}\n")),
                "audit {i} kept"
            );
        }
        let dropped = output.take_dropped();
        assert!(dropped.logs > 150 && dropped.refusals > 150, "{dropped:?}");
        assert_eq!(dropped.audit, 0);
        assert_eq!(
            written.lines().filter(|l| l.starts_with("log ")).count() as u64 + dropped.logs,
            200,
            "every log line is written or counted"
        );
        assert!(!output.take_dropped().any(), "counters are taken once");
    }

    #[test]
    fn audit_events_past_their_cap_are_counted_not_silently_lost() {
        let valve = Valve::default();
        let output = Output::new(valve.clone(), 64, 256).expect("writer thread");
        for i in 0..100 {
            append(&output, Class::Audit, &format!("audit {i:04}\n"));
        }
        valve.set_open(true);
        assert_eq!(output.flush(Duration::from_secs(10)), 0);
        let kept = valve.written().lines().count() as u64;
        assert_eq!(kept + output.take_dropped().audit, 100);
        assert!(kept < 100);
    }

    #[test]
    fn a_sink_that_fails_for_good_counts_as_stalled() {
        struct Closed;
        impl std::io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let output = Output::new(Closed, LOG_CAP, AUDIT_CAP).expect("writer thread");
        append(&output, Class::Audit, "audit\n");
        assert_eq!(output.flush(Duration::from_secs(10)), 0);
        assert!(output.stalled());
        assert_eq!(output.take_dropped().unwritable_bytes, 6);
    }
}
