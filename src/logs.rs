//! Log lines: the JSON line format and the writer they go through.
//!
//! - [`JsonLines`] writes each event as one JSON object straight into the
//!   line buffer: no intermediate map, value or string per field.
//! - [`Output`] takes whole lines without a system call or a wake-up per
//!   line: they are appended to a shared buffer that a writer thread looks
//!   at every few milliseconds and writes to stdout. Nothing is ever dropped: when the
//!   buffer is full (stdout slower than the events), the next line waits
//!   for space — back-pressure on the caller instead of a lost audit event.
//!   [`Output::flush`] writes everything out (at exit).

use std::{
    fmt::{self, Write as _},
    io::Write as _,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use tracing::{Subscriber, field::Field};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter, format::Writer},
    registry::LookupSpan,
};

/// How long lines collect before the writer thread writes them out.
const BATCH: Duration = Duration::from_millis(5);
/// Buffered bytes beyond which a new line waits for the writer (about a
/// few thousand lines: seconds of stdout stalling at full load).
const HIGH_WATER: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// A write-out is in progress (its bytes are out of `bytes` already).
    writing: bool,
}

struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when the buffer is full or a flush is asked.
    work: Condvar,
    /// Signalled after each write-out: room again, or a flush is done.
    done: Condvar,
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
    /// Starts the writer thread for stdout.
    pub(crate) fn stdout() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("credgate-logs".to_owned())
            .spawn(move || write_out(&writer))?;
        Ok(Self { shared })
    }

    /// Returns once every line appended so far has been written to stdout.
    pub(crate) fn flush(&self) {
        let mut buffer = self.shared.lock();
        self.shared.work.notify_one();
        while !buffer.bytes.is_empty() || buffer.writing {
            buffer = self
                .shared
                .done
                .wait(buffer)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn append(&self, line: &[u8]) {
        let mut buffer = self.shared.lock();
        while buffer.bytes.len() + line.len() > HIGH_WATER && !buffer.bytes.is_empty() {
            self.shared.work.notify_one();
            buffer = self
                .shared
                .done
                .wait(buffer)
                .unwrap_or_else(PoisonError::into_inner);
        }
        // No wake-up: the writer comes by within BATCH anyway.
        buffer.bytes.extend_from_slice(line);
    }
}

/// The writer thread: every BATCH (or at once when asked), writes out what
/// has gathered. Polling on a timer costs it a few microseconds per BATCH
/// when idle, and saves every log line a wake-up of this thread.
fn write_out(shared: &Shared) {
    let mut stdout = std::io::stdout();
    let mut spare = Vec::new();
    loop {
        let mut buffer = shared.lock();
        while buffer.bytes.is_empty() {
            buffer = shared
                .work
                .wait_timeout(buffer, BATCH)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::swap(&mut buffer.bytes, &mut spare);
        buffer.writing = true;
        drop(buffer);
        // Nowhere to report a failed write of the log itself: go on.
        let _ = stdout.write_all(&spare);
        let _ = stdout.flush();
        spare.clear();
        shared.lock().writing = false;
        shared.done.notify_all();
    }
}

/// One line in the making; appended to the buffer whole, when dropped.
pub(crate) struct Line {
    output: Output,
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
            self.output.append(&self.bytes);
        }
    }
}

impl<'a> MakeWriter<'a> for Output {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            output: self.clone(),
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
        crate::telemetry::with_current_ids(|trace_id, span_id| {
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

    #[test]
    fn every_line_written_before_a_flush_is_out_after_it() {
        // The writer thread writes to the test's stdout; what matters here
        // is that flush returns only once the buffer is empty.
        let output = Output::stdout().expect("writer thread");
        for i in 0..1000 {
            let mut line = output.make_writer();
            std::io::Write::write_all(&mut line, format!("line {i}\n").as_bytes()).expect("append");
        }
        output.flush();
        let buffer = output.shared.lock();
        assert!(buffer.bytes.is_empty() && !buffer.writing);
    }
}
