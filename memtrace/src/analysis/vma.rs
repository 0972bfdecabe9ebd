//! `memtrace vma`: mmap, munmap, mremap and brk by callsite. It runs on the faults
//! analysis's process table (address spaces, exec/exit, the perf side-band for file paths)
//! with the mapping ledger switched on, and with `--faults` counts the pages each callsite's
//! mappings had touched.
use crate::{
    analysis::FaultsAnalysis,
    collector::VmaLedger,
    engine::ReportKind,
    engine::{Analysis, ReportContext},
    hooks::{self, HookGroup},
    loader::Tracer,
    report::{Format, ReportOptions},
    ring::Ring,
    sideband,
    vma::report::{self, IntervalBase, VmaReport, VmaReportInput},
    Error,
};

pub struct VmaAnalysis {
    inner: FaultsAnalysis,
    /// The counts of the previous interval report.
    base: Option<IntervalBase>,
    top: usize,
    faults: bool,
    args_from_regs: bool,
}

const AT_EXIT: &[&HookGroup] = &[&hooks::PROCESSES, &hooks::MAPPINGS_AT_EXIT];
const AT_EXIT_FAULTS: &[&HookGroup] =
    &[&hooks::PROCESSES, &hooks::MAPPINGS_AT_EXIT, &hooks::FAULTS];
const ENTRY_EXIT: &[&HookGroup] = &[&hooks::PROCESSES, &hooks::MAPPINGS];
const ENTRY_EXIT_FAULTS: &[&HookGroup] = &[&hooks::PROCESSES, &hooks::MAPPINGS, &hooks::FAULTS];

/// Does this kernel pass the raw `sys_exit` tracepoint what [`hooks::MAPPINGS_AT_EXIT`]
/// reads? (Checked against its BTF; otherwise the classic syscall tracepoints serve.)
fn raw_sys_exit_usable() -> bool {
    crate::btf::Btf::from_sys_fs().is_ok_and(|btf| {
        crate::btf::check_raw_args(&btf, "sys_exit", hooks::SYS_EXIT_RAW_ARGS).is_none()
    })
}

impl VmaAnalysis {
    /// `faults`: also count the pages each callsite's mappings had touched.
    pub fn new(top: usize, faults: bool) -> Self {
        Self {
            base: None,
            inner: FaultsAnalysis::new(ReportOptions {
                format: Format::Json,
                top,
                threads: false,
                hist: false,
            }),
            top,
            faults,
            args_from_regs: raw_sys_exit_usable(),
        }
    }

    /// The raw `sys_exit` program reads the calls from the saved registers; else the classic
    /// syscall tracepoints' entry programs stash their arguments.
    pub fn args_from_regs(&self) -> bool {
        self.args_from_regs
    }
}

impl Analysis for VmaAnalysis {
    type Report = VmaReport;

    fn what(&self) -> &'static str {
        "mappings (mmap, munmap, mremap, brk)"
    }

    fn hook_groups(&self) -> &'static [&'static HookGroup] {
        match (self.args_from_regs, self.faults) {
            (true, true) => AT_EXIT_FAULTS,
            (true, false) => AT_EXIT,
            (false, true) => ENTRY_EXIT_FAULTS,
            (false, false) => ENTRY_EXIT,
        }
    }

    fn start(&mut self, tracer: &mut Tracer, system_wide: bool) -> Result<(), Error> {
        self.inner.start(tracer, system_wide)?;
        // Traced processes' mappings at exit are the leak candidates; system-wide, an exited
        // process's rows go with its memory.
        self.inner.collector_mut().vma = Some(VmaLedger::new(!system_wide));
        Ok(())
    }

    fn target_added(&mut self, pid: u32) {
        self.inner.target_added(pid);
    }

    fn drain(&mut self, ring: &mut Ring) -> bool {
        self.inner.drain(ring)
    }

    fn descendants_alive(&self, command: u32) -> bool {
        self.inner.descendants_alive(command)
    }

    fn report(&mut self, ctx: &ReportContext<'_>) -> VmaReport {
        let counters = ctx.tracer.counters();
        let (collector, symbolizer) = self.inner.parts();
        let empty = VmaLedger::new(false);
        let vma = collector.vma.as_ref().unwrap_or(&empty);
        let comms = |pid: u32| vma.comms.get(&pid).map(|c| c.to_string());
        let interval = ctx.kind == ReportKind::Interval;
        let input = VmaReportInput {
            vma,
            since: if interval {
                Some(self.base.get_or_insert_with(IntervalBase::default))
            } else {
                None
            },
            covers_s: ctx.covers.as_secs_f64(),
            comms: &comms,
            counters,
            sideband_lost: collector.stats.sideband_lost,
            undecodable: collector.stats.undecodable,
            records: collector.stats.records,
            duration_s: ctx.elapsed.as_secs_f64(),
            now_ns: sideband::monotonic_ns(),
            top: self.top,
            faults: self.faults,
        };
        let r = report::build(&input, symbolizer);
        if interval {
            self.base = Some(IntervalBase::of(&vma.ledger));
        }
        r
    }
}
