//! Where reports go: stdout or a file, through a fallible writer, so that a closed pipe ends a
//! run quietly and a full disk ends it with a clear error, never a panic.
use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use memtrace::{
    engine::ReportKind,
    report::{self, FaultReport, Format, ReportOptions},
    slab::SlabReport,
};
use serde::Serialize;

/// A report the sink can write: serialized as JSON, or rendered as text.
pub trait Report: Serialize {
    fn render(&self, opts: &ReportOptions) -> String;
}

impl Report for FaultReport {
    fn render(&self, opts: &ReportOptions) -> String {
        report::render(self, opts)
    }
}

impl Report for SlabReport {
    fn render(&self, opts: &ReportOptions) -> String {
        memtrace::slab::render(self, opts.format, opts.top, opts.hist)
    }
}

impl Report for memtrace::procmem::Snapshot {
    fn render(&self, opts: &ReportOptions) -> String {
        memtrace::procmem::render(self, opts.top)
    }
}

impl Report for memtrace::watch::WatchReport {
    fn render(&self, _opts: &ReportOptions) -> String {
        memtrace::watch::render(self)
    }
}

impl Report for memtrace::vma::VmaReport {
    fn render(&self, opts: &ReportOptions) -> String {
        memtrace::vma::render(self, opts.format)
    }
}

/// The value of a JSON document's `report` field.
fn kind_name(kind: ReportKind) -> &'static str {
    match kind {
        ReportKind::Interval => "interval",
        ReportKind::Final => "final",
    }
}

/// What became of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Written,
    /// The reader went away (a closed pipe, as under `| head`): nobody wants more reports.
    ReaderGone,
}

/// The destination of a run's reports and how to lay them out.
pub struct ReportSink {
    out: BufWriter<Box<dyn Write>>,
    /// The `-o` file, for error messages; `None` for stdout.
    path: Option<PathBuf>,
    opts: ReportOptions,
    /// JSON Lines: one compact JSON document per report, for runs with interval reports.
    json_lines: bool,
}

impl ReportSink {
    /// Reports to `path` (created, or truncated) or, without one, to stdout.
    pub fn open(
        path: Option<&Path>,
        opts: ReportOptions,
        with_intervals: bool,
    ) -> anyhow::Result<Self> {
        let out: Box<dyn Write> = match path {
            Some(p) => Box::new(
                File::create(p)
                    .with_context(|| format!("creating the report file {}", p.display()))?,
            ),
            None => Box::new(io::stdout()),
        };
        Ok(Self {
            out: BufWriter::new(out),
            path: path.map(Path::to_path_buf),
            opts,
            json_lines: with_intervals && opts.format == Format::Json,
        })
    }

    /// Writes one report and flushes it, so each interval report is out when it is due.
    pub fn write<R: Report>(&mut self, report: &R, kind: ReportKind) -> anyhow::Result<Delivery> {
        let written = if self.opts.format == Format::Json {
            // Straight into the writer: a report with 100,000 callsites is not held twice more
            // as a JSON value tree and a string.
            let doc = Document {
                report: kind_name(kind),
                inner: report,
            };
            let serialized = if self.json_lines {
                serde_json::to_writer(&mut self.out, &doc)
            } else {
                serde_json::to_writer_pretty(&mut self.out, &doc)
            };
            serialized
                .map_err(io::Error::from)
                .and_then(|()| self.out.write_all(b"\n"))
        } else {
            self.out.write_all(report.render(&self.opts).as_bytes())
        };
        match written.and_then(|()| self.out.flush()) {
            Ok(()) => Ok(Delivery::Written),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Delivery::ReaderGone),
            Err(e) => Err(anyhow::Error::new(e).context(match &self.path {
                Some(p) => format!("writing the report to {}", p.display()),
                None => "writing the report".to_string(),
            })),
        }
    }
}

/// A JSON report document: which report it is, then the report's fields.
#[derive(Serialize)]
struct Document<'a, R> {
    report: &'static str,
    #[serde(flatten)]
    inner: &'a R,
}

/// Writes `text` to stdout (for `memtrace check`), through the same error handling.
pub fn write_stdout(text: &str) -> anyhow::Result<Delivery> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(Delivery::Written),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Delivery::ReaderGone),
        Err(e) => Err(anyhow::Error::new(e).context("writing the report")),
    }
}
