//! `memtrace faults` end to end: the real eBPF programs, real workloads, and memtrace's numbers
//! checked against the kernel's own accounting (`/proc/PID/stat`, read by the workload itself
//! just before it exits). Needs root.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;

mod common;
use common::{memtrace, require_root, start_memtrace, workload};

/// Runs memtrace with `args` and returns (parsed JSON report, workload stdout line fields, output).
fn run_json(args: &[&str]) -> (Value, Output) {
    require_root();
    let out = Command::new(memtrace())
        .args(["faults", "--format", "json"])
        .args(args)
        .output()
        .expect("run memtrace");
    assert!(
        out.status.success(),
        "memtrace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The traced command shares stdout: its `pid=...` line comes before the JSON document.
    let start = stdout
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| stdout.starts_with('{').then_some(0));
    let json = &stdout[start.expect("a JSON document on stdout")..];
    (serde_json::from_str(json).expect("valid JSON"), out)
}

/// Runs the workload with `args` under `memtrace faults --format json`.
fn trace_workload(args: &[&str]) -> (Value, Output) {
    trace_workload_with(&[], args)
}

/// [`trace_workload`] with memtrace flags `flags`.
fn trace_workload_with(flags: &[&str], args: &[&str]) -> (Value, Output) {
    let workload = workload();
    let mut all = flags.to_vec();
    all.extend(["--", workload.to_str().expect("UTF-8 path")]);
    all.extend_from_slice(args);
    run_json(&all)
}

/// `key=value` fields of the workload's report line.
fn workload_fields(out: &Output) -> std::collections::HashMap<String, u64> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("pid="))
        .expect("workload report line");
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn process(report: &Value, pid: u64) -> &Value {
    report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} missing from report: {report}"))
}

fn within(actual: u64, expected: u64, pct: f64) -> bool {
    (actual as f64 - expected as f64).abs() <= expected as f64 * pct / 100.0
}

/// memtrace's minor count for process `p` within 1% of the kernel's minflt in workload fields `w`.
fn assert_minor_matches_kernel(p: &Value, w: &std::collections::HashMap<String, u64>) {
    let minor = p["minor"].as_u64().expect("minor count");
    assert!(
        within(minor, w["minflt"], 1.0),
        "memtrace minor {minor} vs kernel minflt {}",
        w["minflt"]
    );
}

fn callsites_of(report: &Value, pid: u64) -> Vec<&Value> {
    let mut v: Vec<&Value> = report["callsites"]
        .as_array()
        .expect("callsites")
        .iter()
        .filter(|c| c["pid"] == pid)
        .collect();
    v.sort_by_key(|c| std::cmp::Reverse(c["count"].as_u64()));
    v
}

/// Faults of the callsites whose user stack passes through `function`.
fn count_through(sites: &[&Value], function: &str) -> u64 {
    sites
        .iter()
        .filter(|c| frames_text(c).contains(function))
        .map(|c| c["count"].as_u64().unwrap())
        .sum()
}

/// Function names of a callsite's user stack, innermost first.
fn frames_text(site: &Value) -> String {
    stack_text(site, "frames")
}

/// Function names of the stack under `key` ("frames" or "kernel_frames"), innermost first.
fn stack_text(site: &Value, key: &str) -> String {
    site[key]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|x| x["function"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(" <- ")
        })
        .unwrap_or_default()
}

/// The count of the loss cause with this id.
fn lost_count(report: &Value, id: &str) -> u64 {
    report["lost"]["causes"]
        .as_array()
        .expect("lost causes")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no loss cause {id:?}: {}", report["lost"]))["count"]
        .as_u64()
        .expect("count")
}

fn scratch(name: &str) -> String {
    // A disk-backed directory: tmpfs pages never take major faults.
    let dir = std::env::var("MEMTRACE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    format!("{dir}/memtrace-test-{}-{name}", std::process::id())
}

#[test]
fn anonymous_first_touch_matches_kernel_minor_count() {
    let pages = 50_000u64;
    let (r, out) = trace_workload(&["anon", &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    assert_minor_matches_kernel(p, &w);
    // Anonymous memory takes no major faults; the binary's own pages may (a freshly built one
    // not in the page cache yet): as many as the kernel counted.
    assert_eq!(
        p["major"].as_u64(),
        Some(w["majflt"]),
        "kernel majflt {}",
        w["majflt"]
    );
    assert_eq!(r["lost"]["events"], 0, "lost: {}", r["lost"]);
    // Every fault, from the held child's last ones before exec through exec itself, falls in
    // a mapping memtrace knows of.
    assert_eq!(lost_count(&r, "unclassified"), 0, "lost: {}", r["lost"]);
    let top = callsites_of(&r, w["pid"])[0];
    assert!(
        within(top["count"].as_u64().unwrap(), pages, 1.0),
        "top callsite {top}"
    );
    assert_eq!(top["kind"], "minor");
    assert!(
        matches!(
            top["mapping"]["class"].as_str(),
            Some("anon_private" | "heap")
        ),
        "{top}"
    );
    assert!(
        frames_text(top).contains("touch_pages_write"),
        "top callsite frames: {}",
        frames_text(top)
    );
    assert_eq!(top["access"][0]["access"], "write");
    assert_eq!(top["access"][0]["cause"], "not_present");
    // Minor-fault latency is a stated sample (see the test below for its rate), every sample a
    // real fault's.
    let sampling = &r["latency_sampling"];
    assert_eq!(sampling["records_at"], "entry", "{sampling}");
    assert_eq!(sampling["minor_period"], 61, "{sampling}");
    let lat = &p["latency_ns"]["minor"];
    let samples = lat["count"].as_u64().unwrap();
    assert!(
        samples > 0 && samples < pages / 4,
        "{samples} latency samples for {pages} faults: {lat}"
    );
    assert_eq!(sampling["minor_samples"].as_u64(), Some(samples));
    assert!(
        lat["p50"].as_u64().unwrap() > 50,
        "minor latency p50 implausibly small: {lat}"
    );
}

#[test]
fn minor_latency_is_sampled_at_the_stated_rate() {
    // One in 61 on average: 10 ms windows in every 100 ms at a tenth of the period, each
    // window's rate drawn between 0.5 and 1.5 times. Over a second of faults, within a factor
    // of two on a quiet machine; an agent too busy to open its windows on time (a debug build
    // beside other tests on two CPUs measured 1 in 150 once) measures fewer, and says so: the
    // bound here only catches a sample that is off or unbounded.
    let pages = 300_000u64;
    let (r, out) = trace_workload(&["anon-recycle", &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    assert_minor_matches_kernel(p, &w);
    let minor = p["minor"].as_u64().unwrap();
    let samples = p["latency_ns"]["minor"]["count"].as_u64().unwrap();
    assert!(
        (minor / 400..=minor / 15).contains(&samples),
        "{samples} latency samples for {minor} minor faults: {}",
        r["latency_sampling"]
    );
}

#[test]
fn every_fault_latency_measures_every_fault() {
    let pages = 20_000u64;
    let (r, out) = trace_workload_with(&["--every-fault-latency"], &["anon", &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    assert_minor_matches_kernel(p, &w);
    let minor = p["minor"].as_u64().unwrap();
    let lat = &p["latency_ns"]["minor"];
    // Every counted minor fault has its latency (but a few whose completion went missing).
    assert!(
        within(lat["count"].as_u64().unwrap(), minor, 0.5),
        "{lat} for {minor} minor faults"
    );
    assert_eq!(r["latency_sampling"]["minor_period"], 1);
    assert!(lat["p50"].as_u64().unwrap() > 50, "{lat}");
}

#[test]
fn counts_only_still_counts_exactly() {
    let pages = 50_000u64;
    let (r, out) = trace_workload_with(&["--counts-only"], &["anon", &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    assert_minor_matches_kernel(p, &w);
    assert_eq!(p["latency_ns"]["minor"]["count"], 0);
    assert_eq!(r["latency_sampling"]["minor_period"], 0);
    assert_eq!(r["lost"]["events"], 0, "lost: {}", r["lost"]);
    // Classes and access types are still there; stacks are not.
    let anon = p["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["class"] == "anon_private")
        .expect("anon_private class");
    assert!(
        within(anon["minor"].as_u64().unwrap(), pages, 1.0),
        "{anon}"
    );
    let top = callsites_of(&r, w["pid"])[0];
    assert!(frames_text(top).is_empty(), "{top}");
    assert_eq!(top["access"][0]["access"], "write");
}

#[test]
fn faults_the_kernel_fails_are_not_counted() {
    // Each read(2) into a PROT_NONE page is a fault the kernel fails (EFAULT) and never
    // counts: recorded at entry, it must not count either.
    let (failed, pages) = (5_000u64, 5_000u64);
    let (r, out) = trace_workload(&["failed-faults", &failed.to_string(), &pages.to_string()]);
    let w = workload_fields(&out);
    assert_eq!(w["efault"], failed, "the workload's reads did not all fail");
    let p = process(&r, w["pid"]);
    assert_minor_matches_kernel(p, &w);
    let not_accounted = r["faults_not_accounted"].as_u64().unwrap();
    assert!(
        (failed..=failed + 10).contains(&not_accounted),
        "{not_accounted} faults not accounted, {failed} failed"
    );
}

#[test]
fn faults_the_kernel_takes_for_a_thread_are_seen_in_its_counters() {
    // MAP_POPULATE: the kernel faults the pages in itself (get_user_pages), counting minor
    // faults for the thread with no page-fault exception of its own.
    let pages = 10_000u64;
    let (r, out) = trace_workload(&["populate", &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    // Its own faults: the touched pages, not the populated ones.
    let minor = p["minor"].as_u64().unwrap();
    assert!(
        within(minor, w["minflt"] - pages, 1.0),
        "memtrace minor {minor}, kernel {} less {pages} populated",
        w["minflt"]
    );
    let by_kernel = p["faulted_in_by_kernel"]["minor"].as_u64().unwrap_or(0);
    assert!(
        within(by_kernel, pages, 1.0),
        "faulted in by the kernel: {by_kernel}, populated {pages}: {p}"
    );
}

#[test]
fn two_callers_at_the_same_stack_depth_get_their_own_stacks() {
    // The stack cache reuses a walked stack while ip, frame and stack pointers repeat; two
    // callers whose frames share addresses differ only in the return address, so a reuse is
    // walked again after a random number of reuses (32 on average). Each caller must end up with its own faults.
    let pages = 20_000u64;
    let (r, out) = trace_workload(&["two-callers", &pages.to_string()]);
    let w = workload_fields(&out);
    let sites = callsites_of(&r, w["pid"]);
    for caller in ["first_caller", "second_caller"] {
        let n = count_through(&sites, caller);
        assert!(
            within(n, pages, 1.0),
            "{n} faults attributed through {caller}, expected {pages}"
        );
    }
}

#[test]
fn interleaved_callers_get_an_unbiased_share_of_the_stacks() {
    // caller_a, caller_a, caller_a, caller_b, repeating: every fault has the same registers,
    // so the stack cache serves most of them. A re-walk at a fixed period would alias with
    // the pattern and give one caller everything; the random re-walk must come out 75 / 25.
    // Each walk's stack serves a run of 1-64 faults (uniform), so the share is an estimate
    // over pages/32.5 runs: its standard deviation is sqrt(1.32 * 0.1875 * 32.5 / pages),
    // 0.45 points at 400k pages, where the 2 points are 4.4 of them. (A coin toss per
    // fault, a geometric run, measured 24.0-27.3% over 13 runs of 200k.) An aliased re-walk
    // would give 0% or 100%.
    let pages = 400_000u64;
    let (r, out) = trace_workload(&["interleaved-callers", &pages.to_string()]);
    let w = workload_fields(&out);
    let sites = callsites_of(&r, w["pid"]);
    let (a, b) = (
        count_through(&sites, "caller_a"),
        count_through(&sites, "caller_b"),
    );
    assert!(a + b >= pages * 99 / 100, "a {a} b {b} of {pages}");
    let share_b = b as f64 / (a + b) as f64;
    assert!(
        (share_b - 0.25).abs() <= 0.02,
        "caller_b got {:.1}% of the faults, expected 25%",
        share_b * 100.0
    );
    assert!(
        r["stack_cache_hits"].as_u64().unwrap() > pages / 2,
        "the stack cache served most faults: {}",
        r["stack_cache_hits"]
    );
}

#[test]
fn a_hundred_thousand_distinct_stacks_are_all_kept() {
    // Every fault at the end of its own call chain. The stack cache is off: the chains end
    // at the same registers, so it would serve most faults a sampled stack (the test above
    // checks that sample); here every stack must be walked, kept and reported as its own.
    let paths = 100_000u64;
    // 100,000 walked stacks are ~32 MB of records in well under a second: a 64 MiB ring
    // holds them all even while other tests starve the agent of CPU (a 16 MiB one lost a few
    // hundred so). The point here is the stack tables, not the ring.
    let (r, out) = trace_workload_with(
        &["--no-stack-cache", "--top", "300", "--ringbuf-mb", "64"],
        &["distinct-stacks", &paths.to_string()],
    );
    let w = workload_fields(&out);
    for id in [
        "stack_table_full",
        "callsite_table_full",
        "ringbuf_full_fault",
    ] {
        assert_eq!(lost_count(&r, id), 0, "{id}");
    }
    // One callsite per chain, a handful more for the workload's start and exit.
    let total = r["callsites_total"].as_u64().expect("callsites_total");
    assert!(
        (paths..paths + 500).contains(&total),
        "{total} callsites for {paths} distinct stacks"
    );
    // Past the few callsites of the workload's start (more than one fault each), chains.
    let sites = callsites_of(&r, w["pid"]);
    // Not a fault on the stack itself: deep recursion in a debug build grows the stack, and
    // those faults come partway down a chain.
    let site = sites
        .iter()
        .find(|c| frames_text(c).contains("go_") && c["mapping"]["class"] != "stack")
        .expect("a chain among the top callsites");
    let chain = frames_text(site);
    let levels = w["levels"] as usize;
    assert_eq!(site["count"], 1, "each chain faulted once");
    assert_eq!(
        chain.matches("go_left").count() + chain.matches("go_right").count(),
        levels,
        "a whole chain of {levels} levels: {chain}"
    );
    // 100,000 stacks ~25 frames deep, each its own callsite: 93 MiB measured with a release
    // build (16 MiB of ring buffer included), more with the debug build these tests run. The
    // bound catches a return to a resolved copy of every stack (+80 MiB).
    let peak = r["agent"]["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak < 300 << 20, "agent peak RSS {} MiB", peak >> 20);
}

#[test]
fn a_frameless_leaf_keeps_its_caller() {
    // memtrace_leaf_store sets up no frame: the frame-pointer walk goes from it straight to
    // leaf_touch. The words read at the stack pointer and the leaf's CFI put leaf_caller back.
    let pages = 20_000u64;
    let (r, out) = trace_workload(&["leaf-touch", &pages.to_string()]);
    let w = workload_fields(&out);
    let sites = callsites_of(&r, w["pid"]);
    let with_caller: u64 = sites
        .iter()
        .filter(|c| {
            let frames = frames_text(c);
            let mut names = frames.split(" <- ");
            names
                .next()
                .is_some_and(|f| f.contains("memtrace_leaf_store"))
                && names.next().is_some_and(|f| f.ends_with("leaf_caller"))
                && names.next().is_some_and(|f| f.ends_with("leaf_touch"))
        })
        .map(|c| c["count"].as_u64().unwrap())
        .sum();
    assert!(
        with_caller >= pages * 99 / 100,
        "{with_caller} of {pages} faults read leaf -> leaf_caller -> leaf_touch; top stack: {}",
        sites.first().map(|c| frames_text(c)).unwrap_or_default()
    );
    assert!(
        r["leaf_callers_recovered"].as_u64().unwrap() > 0,
        "{}",
        r["leaf_callers_recovered"]
    );
}

#[test]
fn a_fork_exec_storm_stays_within_bounded_memory() {
    // Thousands of short-lived processes: each exited one is reduced to totals and merged
    // callsites, so the agent's memory does not grow with their number.
    let (r, _out) = run_json(&[
        "--top",
        "100",
        "--",
        "bash",
        "-c",
        "for i in $(seq 3000); do /bin/true; done",
    ]);
    let peak = r["agent"]["peak_rss_bytes"]
        .as_u64()
        .expect("agent peak RSS");
    assert!(peak < 150 << 20, "agent peak RSS {} MiB", peak >> 20);
    let trues: u64 = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["comm"] == "true")
        .map(|p| p["processes"].as_u64().unwrap())
        .sum();
    assert!(
        trues >= 2990,
        "{trues} true processes in {}",
        r["processes"]
    );
    assert_eq!(lost_count(&r, "ringbuf_full_fault"), 0);
    assert_eq!(lost_count(&r, "callsite_table_full"), 0);
}

#[test]
fn short_lived_processes_are_classified_and_symbolized() {
    // Processes that exec and exit within a millisecond are gone before /proc can be read:
    // their mappings come from the perf side-band, recorded as the kernel makes them.
    let wl = workload();
    let script = format!(
        "for i in $(seq 100); do /bin/true; {} anon 20 >/dev/null; done",
        wl.display()
    );
    let (r, _) = run_json(&["--top", "1000000", "--", "sh", "-c", &script]);
    let sites = r["callsites"].as_array().expect("callsites");
    assert_eq!(
        r["callsites_total"].as_u64(),
        Some(sites.len() as u64),
        "every callsite in the report"
    );
    // The workload's comm is its file name, cut to 15 bytes.
    for comm in ["true", "memtrace-worklo"] {
        let of_comm: Vec<&Value> = sites.iter().filter(|c| c["comm"] == comm).collect();
        let total: u64 = of_comm.iter().map(|c| c["count"].as_u64().unwrap()).sum();
        let outside = |c: &&&Value| {
            c["mapping"]["class"] == "other"
                && !c["mapping"]["path"].as_str().unwrap_or("").starts_with('[')
        };
        let unmapped = |c: &&&Value| {
            c["frames"]
                .as_array()
                .and_then(|f| f.first())
                .is_none_or(|f| f["module"] == "[unmapped]")
        };
        let sum = |f: &dyn Fn(&&&Value) -> bool| -> u64 {
            of_comm
                .iter()
                .filter(|c| f(c))
                .map(|c| c["count"].as_u64().unwrap())
                .sum()
        };
        let (outside, unmapped) = (sum(&outside), sum(&unmapped));
        assert!(total >= 100 * 20, "{comm}: only {total} faults");
        assert!(
            outside * 100 < total,
            "{comm}: {outside} of {total} faults outside every known mapping"
        );
        assert!(
            unmapped * 100 < total,
            "{comm}: {unmapped} of {total} faults with no mapped first frame"
        );
    }
    // Symbolized after exit: every page the workload touched is under its own function.
    let workload_sites: Vec<&Value> = sites
        .iter()
        .filter(|c| c["comm"] == "memtrace-worklo")
        .collect();
    let touched = count_through(&workload_sites, "touch_pages_write");
    assert!(
        touched >= 100 * 20,
        "{touched} faults under touch_pages_write"
    );
    assert_eq!(lost_count(&r, "sideband_lost"), 0);
}

#[test]
fn faults_in_kernel_mode_carry_the_kernel_stack() {
    // read(2) from /dev/zero into untouched memory: the kernel takes every fault in its
    // copy-out, so each is kernel-mode with both stacks.
    // Enough pages that the ~20 faults the child takes before memtrace follows it stay < 1%.
    let pages = 20_000u64;
    let (r, out) = trace_workload(&["kernel-touch", &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    let kernel_mode = p["kernel_mode"].as_u64().unwrap();
    assert!(
        within(kernel_mode, pages, 1.0),
        "kernel-mode faults {kernel_mode}, expected {pages}"
    );
    assert_minor_matches_kernel(p, &w);
    let top = callsites_of(&r, w["pid"])[0];
    assert!(
        within(top["count"].as_u64().unwrap(), pages, 1.0),
        "top callsite {top}"
    );
    let kernel = stack_text(top, "kernel_frames");
    assert!(
        kernel.contains("read_zero"),
        "kernel stack should pass through read_zero: {kernel}"
    );
    assert!(
        frames_text(top).contains("read_zero_into"),
        "user stack should name the reading function: {}",
        frames_text(top)
    );
    assert_eq!(top["mapping"]["class"], "anon_private");
    assert_eq!(top["access"][0]["access"], "write");
}

#[test]
fn a_command_that_sleeps_forks_and_moves_between_cpus_is_counted_exactly() {
    // The demo: heap, a cold file (major faults that sleep on I/O and may wake on the other
    // CPU), shared memory, two children. Each fault is settled by its thread's next one, so a
    // thread's records must arrive in order whichever CPU they were made on.
    let dir = std::env::var("MEMTRACE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let (r, _) = trace_workload(&["demo", &dir]);
    let k = &r["kernel_counts"];
    let kernel = (
        k["kernel"]["minor"].as_u64().unwrap(),
        k["kernel"]["major"].as_u64().unwrap(),
    );
    let seen = (
        k["memtrace"]["minor"].as_u64().unwrap(),
        k["memtrace"]["major"].as_u64().unwrap(),
    );
    let by_kernel = (
        k["faulted_in_by_kernel"]["minor"].as_u64().unwrap(),
        k["faulted_in_by_kernel"]["major"].as_u64().unwrap(),
    );
    assert!(within(seen.0, kernel.0, 1.0), "{k}");
    assert!(within(seen.1, kernel.1, 1.0), "{k}");
    // Out-of-order records would read as faults the kernel took for a thread.
    assert!(by_kernel.0 < 20 && by_kernel.1 == 0, "{k}");
    // The rest of the kernel's count: the child's faults before memtrace followed it. Together
    // they account for every fault, to a few (the last ones of an exiting thread).
    let before = k["before_followed"]["minor"].as_u64().unwrap_or(0);
    let accounted = seen.0 + by_kernel.0 + before;
    assert!(
        accounted.abs_diff(kernel.0) <= 5,
        "{accounted} accounted for, kernel {}: {k}",
        kernel.0
    );
    assert_eq!(
        lost_count(&r, "completion_without_entry"),
        0,
        "{}",
        r["lost"]
    );
    assert_eq!(r["faults_not_accounted"], 0);
}

#[test]
fn cold_file_reads_are_major_faults_on_the_file() {
    let pages = 2_000u64;
    let path = scratch("major.dat");
    let (r, out) = trace_workload(&["file", &path, &pages.to_string()]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    let major = p["major"].as_u64().unwrap();
    assert!(
        within(major, pages, 1.0),
        "memtrace major {major}, expected {pages}"
    );
    assert!(
        within(major, w["majflt"], 1.0),
        "memtrace major {major} vs kernel majflt {}",
        w["majflt"]
    );
    let site = callsites_of(&r, w["pid"])
        .into_iter()
        .find(|c| c["kind"] == "major")
        .expect("a major callsite");
    assert_eq!(site["mapping"]["class"], "file_private");
    assert_eq!(site["mapping"]["path"], path.as_str());
    assert!(
        frames_text(site).contains("touch_pages_read"),
        "{}",
        frames_text(site)
    );
    let (maj, min) = (&p["latency_ns"]["major"], &p["latency_ns"]["minor"]);
    assert!(
        maj["p50"].as_u64() > min["p50"].as_u64(),
        "major p50 {maj} should exceed minor p50 {min}"
    );
    assert!(maj["p99"].as_u64() > min["p99"].as_u64());
}

#[test]
fn the_kernels_own_count_stands_beside_memtraces() {
    // O_DIRECT reads into fresh memory: the kernel faults the buffer in through
    // get_user_pages, which counts in minflt but raises no fault event. The report must set
    // the kernel's count beside its own instead of pretending to have seen everything.
    let path = scratch("odirect");
    let mib = 40u64;
    std::fs::write(&path, vec![7u8; (mib << 20) as usize]).expect("write scratch file");
    let (r, _) = run_json(&[
        "--",
        "dd",
        &format!("if={path}"),
        "of=/dev/null",
        &format!("bs={mib}M"),
        "count=1",
        "iflag=direct",
    ]);
    let _ = std::fs::remove_file(&path);
    let k = &r["kernel_counts"];
    assert_eq!(k["processes"], 1, "{k}");
    let kernel = k["kernel"]["minor"].as_u64().expect("kernel minor");
    let seen = k["memtrace"]["minor"].as_u64().expect("memtrace minor");
    assert_eq!(seen, r["minor"].as_u64().unwrap());
    let pages = (mib << 20) / 4096;
    assert!(
        kernel >= seen + pages * 9 / 10,
        "kernel {kernel}, memtrace {seen}: the buffer's {pages} pages are the difference"
    );
    assert!(k["note"].as_str().unwrap().contains("get_user_pages"));
}

#[test]
fn copy_on_write_is_a_write_protection_fault() {
    let pages = 2_000u64;
    let path = scratch("cow.dat");
    let (r, out) = trace_workload(&["cow", &path, &pages.to_string()]);
    let w = workload_fields(&out);
    let cow: u64 = callsites_of(&r, w["pid"])
        .iter()
        .filter(|c| {
            c["mapping"]["class"] == "file_private" && c["mapping"]["path"] == path.as_str()
        })
        .flat_map(|c| c["access"].as_array().unwrap().iter())
        .filter(|a| a["access"] == "write" && a["cause"] == "protection")
        .map(|a| a["count"].as_u64().unwrap())
        .sum();
    assert!(
        within(cow, pages, 1.0),
        "write/protection faults on {path}: {cow}, expected {pages}"
    );
}

#[test]
fn thread_counts_add_up_to_the_process() {
    let (r, out) = trace_workload(&["threads", "4", "5000"]);
    let w = workload_fields(&out);
    let p = process(&r, w["pid"]);
    let threads = p["threads"].as_array().unwrap();
    assert!(threads.len() >= 5, "main + 4 workers: {threads:?}");
    let sum: u64 = threads
        .iter()
        .map(|t| t["minor"].as_u64().unwrap() + t["major"].as_u64().unwrap())
        .sum();
    assert_eq!(
        sum,
        p["minor"].as_u64().unwrap() + p["major"].as_u64().unwrap()
    );
    assert!(
        threads
            .iter()
            .filter(|t| t["minor"].as_u64().unwrap() >= 5000)
            .count()
            >= 4,
        "{threads:?}"
    );
    assert_minor_matches_kernel(p, &w);
}

#[test]
fn forked_children_are_followed_and_symbolized_after_exit() {
    let (r, out) = trace_workload(&["forks", "3", "3000"]);
    let w = workload_fields(&out);
    let children: Vec<&Value> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["pid"] != w["pid"])
        .collect();
    assert_eq!(children.len(), 3, "three children: {}", r["processes"]);
    for c in children {
        assert!(c["exited"].as_bool().unwrap());
        assert!(c["minor"].as_u64().unwrap() >= 3000, "{c}");
        let top = callsites_of(&r, c["pid"].as_u64().unwrap())[0];
        assert!(
            frames_text(top).contains("touch_pages_write"),
            "child stack: {}",
            frames_text(top)
        );
    }
}

#[test]
fn attach_by_pid_counts_what_happens_after_attach() {
    require_root();
    let mut wl = Command::new(workload())
        .args(["wait-then-anon", "20000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut wl_out = BufReader::new(wl.stdout.take().unwrap());
    let mut line = String::new();
    wl_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let pid = wl.id().to_string();
    let (mt, banner) = start_memtrace(
        &["faults", "--format", "json", "-d", "60s", "-p", &pid],
        Stdio::piped(),
    );
    assert!(banner.contains("tracing page faults of pid"), "{banner}");
    wl.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut report_line = String::new();
    wl_out.read_line(&mut report_line).unwrap();
    wl.wait().unwrap();
    // memtrace ends on its own when the pid exits.
    let out = mt.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    let delta: u64 = report_line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("delta_minflt="))
        .unwrap()
        .parse()
        .unwrap();
    let minor = process(&r, pid.parse().unwrap())["minor"].as_u64().unwrap();
    assert!(
        minor >= delta && within(minor, delta, 2.0),
        "memtrace {minor} vs kernel delta {delta}"
    );
}

#[test]
fn system_wide_sees_several_processes() {
    require_root();
    let (mt, _banner) = start_memtrace(
        &["faults", "--format", "json", "-d", "3s", "--top", "100000"],
        Stdio::piped(),
    );
    // Under names of their own: the other tests run workloads in parallel, and past eight
    // exited processes of one name the report folds them into one row per name.
    let dir = std::env::temp_dir().join(format!("memtrace-sw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pids: Vec<u64> = (0..3)
        .map(|i| {
            let link = dir.join(format!("mt-sw-{i}"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(workload(), &link).unwrap();
            let out = Command::new(&link).args(["anon", "3000"]).output().unwrap();
            workload_fields(&out)["pid"]
        })
        .collect();
    let out = mt.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    for (i, pid) in pids.into_iter().enumerate() {
        let p = process(&r, pid);
        assert_eq!(p["comm"], format!("mt-sw-{i}"));
        assert!(p["minor"].as_u64().unwrap() >= 3000);
    }
}

fn run_fail(args: &[&str]) -> (i32, String) {
    let out = Command::new(memtrace()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_input_gets_a_clear_error() {
    require_root();
    let (code, err) = run_fail(&["faults", "-p", "999999999"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no process with pid 999999999"), "{err}");
    let (code, err) = run_fail(&["faults", "--", "/nonexistent/command"]);
    assert_eq!(code, 127, "{err}");
    assert!(
        err.contains("cannot start /nonexistent/command") && err.contains("not found"),
        "{err}"
    );
    let (code, err) = run_fail(&["faults", "-d", "soon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad duration"), "{err}");
    // Not root: drop privileges in the child before exec.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(memtrace())
        .args(["faults", "-d", "1s"])
        .output();
    if let Ok(out) = out {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{err}");
        assert!(err.contains("needs root"), "{err}");
    }
}

#[test]
fn pid_exiting_mid_run_still_gets_a_report() {
    require_root();
    let mut wl = Command::new(workload())
        .args(["sleep", "700"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = wl.id().to_string();
    let started = std::time::Instant::now();
    let out = Command::new(memtrace())
        .args(["faults", "-d", "30s", "-p", &pid])
        .output()
        .unwrap();
    wl.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "memtrace should end when the pid exits"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("memtrace faults:") && stdout.contains("Lost:"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_probe() {
    require_root();
    let out = Command::new(memtrace()).args(["check"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for needle in [
        "tracefs",
        "exceptions:page_fault_user",
        "PageFaultsMaj",
        "lockdown",
        "load + attach all programs",
    ] {
        assert!(stdout.contains(needle), "missing {needle}: {stdout}");
    }
}
