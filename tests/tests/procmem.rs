//! `memtrace snapshot` and `memtrace watch` against real processes, checked against the
//! kernel's own accounting (/proc/PID/smaps_rollup). Needs root (to run workloads as another
//! user and to read every process).
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

mod common;
use common::{memtrace, require_root, workload};

const MIB: u64 = 1 << 20;

/// A workload started and read up to its first line; killed when dropped.
struct Workload {
    child: Child,
    line: String,
}

impl Workload {
    fn start(args: &[&str], as_nobody: bool) -> Self {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(workload());
            c
        } else {
            Command::new(workload())
        };
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the workload");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the workload's first line");
        Self { child, line }
    }

    /// A workload that prints only at its end.
    fn start_quiet(args: &[&str]) -> Self {
        let child = Command::new(workload())
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the workload");
        Self {
            child,
            line: String::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `key=value` from its first line.
    fn value(&self, key: &str) -> u64 {
        self.line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {}", self.line))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs memtrace (as `nobody` when asked): (exit code, stdout, stderr), never a panic.
fn run(args: &[&str], as_nobody: bool) -> (i32, String, String) {
    let out = if as_nobody {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(memtrace())
            .args(args)
            .output()
    } else {
        Command::new(memtrace()).args(args).output()
    }
    .expect("run memtrace");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `Name: N kB` of /proc/PID/smaps_rollup, in bytes.
fn rollup(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("rollup");
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in {text}"))
        * 1024
}

fn within(got: u64, want: u64, frac: f64) -> bool {
    (got as f64 - want as f64).abs() <= want as f64 * frac
}

fn snapshot_kinds(as_nobody: bool) {
    let path = format!("/var/tmp/memtrace-kinds-{}-{as_nobody}", std::process::id());
    let w = Workload::start(
        &["kinds", "16384", "8192", &path, "16384", "60000"],
        as_nobody,
    );
    let pid = w.pid();
    let (code, out, err) = run(
        &["snapshot", "-p", &pid.to_string(), "--format", "json"],
        as_nobody,
    );
    // The workload is idle now: the kernel's totals are those memtrace read.
    let (rss, pss, swap) = (rollup(pid, "Rss"), rollup(pid, "Pss"), rollup(pid, "Swap"));
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let p = &v["processes"][0];
    assert_eq!(p["pid"], pid);
    assert_eq!(p["comm"], "memtrace-worklo");
    assert_eq!(p["rss"], rss, "{p}");
    // PSS divides each shared page by the processes mapping it at that moment: memtrace
    // itself, mapping libc, was one of them when it read. Only shared pages can move it.
    let shared = rss - p["uss"].as_u64().unwrap();
    let read_pss = p["pss"].as_u64().unwrap();
    assert!(
        read_pss.abs_diff(pss) <= shared,
        "{read_pss} vs {pss}, shared {shared}"
    );
    assert_eq!(p["swap"], swap, "{p}");
    let kind = |k: &str| p["kinds"][k]["rss"].as_u64().unwrap();
    let (anon, shm, file) = (
        w.value("anon_bytes"),
        w.value("shm_bytes"),
        w.value("file_bytes"),
    );
    assert!(within(kind("anon_private"), anon, 0.05), "{p}");
    assert!(within(kind("anon_shared"), shm, 0.05), "{p}");
    assert!(within(kind("file_private"), file, 0.05), "{p}");
    // The kinds add up to the whole, and nothing was left unclassified in quantity.
    let sum: u64 = [
        "anon_private",
        "anon_shared",
        "file_private",
        "file_shared",
        "heap",
        "stack",
        "other",
    ]
    .iter()
    .map(|k| kind(k))
    .sum();
    assert!(within(sum, rss, 0.01), "{sum} vs {rss}");
    assert!(p["uss"].as_u64().unwrap() >= anon + shm / 2, "{p}");
    assert!(p["vss"].as_u64().unwrap() >= rss, "{p}");
}

#[test]
fn snapshot_reports_each_kind_and_the_kernels_totals() {
    require_root();
    snapshot_kinds(false);
}

#[test]
fn snapshot_works_without_root_for_your_own_processes() {
    require_root();
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: no setpriv");
        return;
    }
    snapshot_kinds(true);
    // Someone else's process (this test's, root's): a clear refusal, not a panic.
    let me = std::process::id().to_string();
    let (code, _, err) = run(&["snapshot", "-p", &me], true);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("permission denied"), "{err}");
    // System-wide: its own processes, the others counted as not read.
    let w = Workload::start(&["kinds", "256", "0", "", "0", "60000"], true);
    let (code, out, err) = run(&["snapshot", "--format", "json"], true);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let pids: Vec<u64> = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert!(pids.contains(&u64::from(w.pid())), "{pids:?}");
    assert!(!v["skipped"].as_array().unwrap().is_empty());
}

#[test]
fn snapshot_of_every_process_is_quick_and_adds_up() {
    require_root();
    let w = Workload::start(&["kinds", "4096", "0", "", "0", "60000"], false);
    let started = std::time::Instant::now();
    let (code, out, err) = run(&["snapshot", "--format", "json"], false);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let procs = v["processes"].as_array().unwrap();
    let row = procs
        .iter()
        .find(|p| p["pid"] == w.pid())
        .expect("the workload listed");
    assert!(row["uss"].as_u64().unwrap() >= 16 * MIB, "{row}");
    // Sorted by USS.
    let uss: Vec<u64> = procs.iter().map(|p| p["uss"].as_u64().unwrap()).collect();
    assert!(uss.windows(2).all(|w| w[0] >= w[1]), "{uss:?}");
    let sys = &v["system"];
    let total = sys["mem_total"].as_u64().unwrap();
    assert!(
        total > 0 && sys["anon_pages"].as_u64().unwrap() >= 16 * MIB,
        "{sys}"
    );
    // Processes' private memory is in AnonPages (the seeds' accounting).
    assert!(
        sys["anon_pages"].as_u64().unwrap() + sys["shmem"].as_u64().unwrap()
            >= row["kinds"]["anon_private"]["rss"].as_u64().unwrap()
    );
    assert!(!sys["slab_caches"].as_array().unwrap().is_empty(), "{sys}");
    assert!(v["took_ms"].as_f64().unwrap() < 1000.0, "{v}");
    assert!(took.as_secs_f64() < 2.0, "{took:?}");
    // The table names the system's parts.
    let (code, out, _) = run(&["snapshot"], false);
    assert_eq!(code, 0);
    for part in ["AnonPages", "Cached", "Shmem", "Slab", "USS"] {
        assert!(out.contains(part), "{part}: {out}");
    }
}

#[test]
fn snapshot_bad_pids() {
    require_root();
    let (code, _, err) = run(&["snapshot", "-p", "4194305"], false);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no such process"), "{err}");
    let (code, _, err) = run(&["snapshot", "-p", "2"], false);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("kernel thread"), "{err}");
    // One good pid among bad ones: its report, and the others named in it.
    let w = Workload::start(&["kinds", "16", "0", "", "0", "60000"], false);
    let (code, out, err) = run(
        &["snapshot", "-p", &w.pid().to_string(), "-p", "4194305"],
        false,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not read: pid 4194305"), "{out}");
    let (code, _, err) = run(&["snapshot", "--format", "folded"], false);
    assert_eq!(code, 2, "{err}");
}

/// A background `memtrace watch` run to its end: (exit code, stdout, stderr).
fn watch(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["watch"];
    all.extend_from_slice(args);
    run(&all, false)
}

fn findings(v: &Value) -> &Vec<Value> {
    v["findings"].as_array().expect("findings")
}

#[test]
fn watch_flags_a_leak_with_its_rate_and_code_not_a_steady_workload() {
    require_root();
    let leak = Workload::start_quiet(&["leak", "1048576", "60000"]);
    let steady = Workload::start_quiet(&["steady", "33554432", "60000"]);
    let plot = format!("/tmp/memtrace-watch-{}.svg", std::process::id());
    let (code, out, err) = watch(&[
        "-p",
        &leak.pid().to_string(),
        "-p",
        &steady.pid().to_string(),
        "-d",
        "30s",
        "--trace",
        "--format",
        "json",
        "--plot",
        &plot,
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let f = findings(&v);
    let leaks: Vec<&Value> = f.iter().filter(|f| f["pid"] == leak.pid()).collect();
    assert_eq!(leaks.len(), 1, "{out}");
    let l = leaks[0];
    assert_eq!(l["kind"], "uss");
    let rate = l["rate_bytes_per_s"].as_f64().unwrap();
    assert!(within(rate as u64, MIB, 0.5), "rate {rate}: {l}");
    assert!(l["confidence"].as_f64().unwrap() >= 0.7, "{l}");
    assert!(l["flagged_at_s"].as_f64().unwrap() <= 30.0, "{l}");
    // --trace named the function that leaks.
    let frames = l["callsites"].to_string();
    assert!(frames.contains("leak_chunk"), "{l}\n{err}");
    // kmem:rss_stat named the thread that grew it (the main thread), by about the rate over
    // the trace (10 s).
    let t = &l["threads"][0];
    assert_eq!(t["tid"], leak.pid(), "{l}");
    let grown = t["grown_bytes"].as_u64().unwrap();
    assert!(
        within(grown, 10 * MIB, 0.5),
        "grew {grown} in the trace: {l}"
    );
    // With -p, only those processes: no slab cache is watched.
    assert_eq!(v["caches"], 0, "{out}");
    // The steady workload, as large and as busy, is not flagged.
    assert!(
        !f.iter().any(|f| f["pid"] == steady.pid()),
        "steady workload flagged: {out}"
    );
    // The live lines said what grew.
    assert!(err.contains("growing: uss pid"), "{err}");
    let svg = std::fs::read_to_string(&plot).expect("the plot");
    let _ = std::fs::remove_file(&plot);
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
    assert!(svg.contains("(flagged)"));
}

#[test]
fn watch_flags_address_space_reserved_and_not_touched() {
    require_root();
    let w = Workload::start_quiet(&["reserve", "4194304", "60000"]);
    let (code, out, err) = watch(&[
        "-p",
        &w.pid().to_string(),
        "-d",
        "25s",
        "--trace",
        "--trace-for",
        "5s",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let f = findings(&v);
    let space: Vec<&Value> = f.iter().filter(|f| f["kind"] == "address_space").collect();
    assert_eq!(space.len(), 1, "{out}");
    let rate = space[0]["rate_bytes_per_s"].as_f64().unwrap();
    assert!(within(rate as u64, 4 * MIB, 0.5), "rate {rate}: {out}");
    // Nothing was touched: no USS growth.
    assert!(!f.iter().any(|f| f["kind"] == "uss"), "{out}");
    // vma named the code that maps.
    assert!(
        space[0]["callsites"].to_string().contains("reserve_chunk"),
        "{out}\n{err}"
    );
}

#[test]
fn watch_goes_on_when_a_process_exits_and_refuses_bad_pids() {
    require_root();
    // Exits after 2 s: the watch ends with it, with a note and a summary.
    let short = Workload::start_quiet(&["steady", "1048576", "2000"]);
    let (code, out, err) = watch(&[
        "-p",
        &short.pid().to_string(),
        "-d",
        "20s",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["ended_by"], "targets_exited", "{out}");
    assert!(v["notes"].to_string().contains("exited after"), "{out}");
    assert!(v["duration_s"].as_f64().unwrap() < 10.0, "{out}");
    // A kernel thread, and a pid that does not exist.
    let (code, _, err) = watch(&["-p", "2", "-d", "2s"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("kernel thread"), "{err}");
    let (code, _, err) = watch(&["-p", "4194305", "-d", "2s"]);
    assert_eq!(code, 3, "{err}");
    // Another user's process, without root: a clear refusal.
    let me = std::process::id().to_string();
    let (code, _, err) = run(&["watch", "-p", &me, "-d", "2s"], true);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("permission denied"), "{err}");
    let (code, _, err) = watch(&["--window", "0s"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = watch(&["-i", "5s", "--window", "10s"]);
    assert_eq!(code, 2, "a window of two samples: {err}");
    // A plot that cannot be written fails at once, not after the watch.
    let started = std::time::Instant::now();
    let (code, _, err) = watch(&["-d", "20s", "--plot", "/nonexistent-dir/w.svg"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("creating the plot file"), "{err}");
    assert!(started.elapsed().as_secs() < 5);
}

#[test]
fn watch_of_every_process_samples_statm_and_slab() {
    require_root();
    let (code, out, err) = watch(&["-d", "3s", "-i", "500ms", "--format", "json", "-q"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["uss_source"], "statm");
    assert!(v["processes"].as_u64().unwrap() > 0, "{out}");
    assert!(v["caches"].as_u64().unwrap() > 10, "{out}");
    assert!(v["samples"].as_u64().unwrap() >= 5, "{out}");
    assert!(!err.contains("[ "), "-q prints no live line: {err}");
}

/// `memtrace vma -- memtrace-workload regions N PAGES UNMAP HOLD`: its JSON report.
fn vma_of_regions(n: usize, pages: usize, unmap: usize, faults: bool) -> Value {
    let out = format!("/tmp/memtrace-vma-{}-{unmap}.json", std::process::id());
    let (n_s, pages_s, unmap_s) = (n.to_string(), pages.to_string(), unmap.to_string());
    let mut args = vec!["vma", "--format", "json", "--top", "0", "-o", &out];
    if faults {
        args.push("--faults");
    }
    args.push("--");
    let w = workload();
    let w = w.to_str().unwrap();
    args.extend([w, "regions", &n_s, &pages_s, &unmap_s, "200"]);
    let (code, _, err) = run(&args, false);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&out).expect("the report");
    let _ = std::fs::remove_file(&out);
    json(&text)
}

/// The callsite whose stack passes through `function`.
fn callsite_through<'a>(v: &'a Value, function: &str) -> Vec<&'a Value> {
    v["callsites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["frames"].to_string().contains(function))
        .collect()
}

#[test]
fn vma_reports_regions_left_mapped_by_their_callsite() {
    require_root();
    let (n, pages) = (50u64, 16u64);
    let v = vma_of_regions(n as usize, pages as usize, 0, true);
    let sites = callsite_through(&v, "map_regions");
    assert_eq!(sites.len(), 1, "{v}");
    let c = sites[0];
    assert_eq!(c["kind"], "anon_private", "{c}");
    assert_eq!(c["outstanding_bytes"], n * pages * 4096, "{c}");
    assert_eq!(c["outstanding_regions"], n, "{c}");
    assert_eq!(c["mapped_bytes"], n * pages * 4096, "{c}");
    assert_eq!(c["unmapped_bytes"], 0, "{c}");
    assert!(c["max_age_ms"].as_u64().unwrap() >= 150, "held 200 ms: {c}");
    // --faults: one page of each region touched, the rest only reserved.
    assert_eq!(c["touched_bytes"], n * 4096, "{c}");
    // The frames name the caller of mmap (recovered past libc's frameless wrapper).
    let frames = c["frames"].to_string();
    assert!(frames.contains("map_anon"), "{frames}");
    assert_eq!(v["lost"]["events"], 0, "{v}");
    assert!(v["totals"]["calls"]["mmap"].as_u64().unwrap() >= n);
}

#[test]
fn vma_counts_unmapped_regions_and_partial_unmaps_exactly() {
    require_root();
    let (n, pages) = (40u64, 16u64);
    let v = vma_of_regions(n as usize, pages as usize, 1, false);
    let c = callsite_through(&v, "map_regions")[0];
    assert_eq!(c["outstanding_bytes"], 0, "{c}");
    assert_eq!(c["outstanding_regions"], 0, "{c}");
    assert_eq!(c["unmapped_bytes"], n * pages * 4096, "{c}");
    assert!(c.get("touched_bytes").is_none(), "no --faults: {c}");
    // Half of each region unmapped: half the bytes, every region still there.
    let v = vma_of_regions(n as usize, pages as usize, 2, false);
    let c = callsite_through(&v, "map_regions")[0];
    assert_eq!(c["outstanding_bytes"], n * pages / 2 * 4096, "{c}");
    assert_eq!(c["outstanding_regions"], n, "{c}");
}

#[test]
fn vma_follows_a_running_process_and_the_whole_system() {
    require_root();
    // Attached to a process leaking heap: its brk growth, as heap, byte for byte.
    let leak = Workload::start_quiet(&["leak", "1048576", "60000"]);
    let (code, out, err) = run(
        &[
            "vma",
            "-p",
            &leak.pid().to_string(),
            "-d",
            "3s",
            "--format",
            "json",
        ],
        false,
    );
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let heap: u64 = v["callsites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "heap" && c["pid"] == leak.pid())
        .map(|c| c["outstanding_bytes"].as_u64().unwrap())
        .sum();
    assert!((MIB..=5 * MIB).contains(&heap), "heap growth {heap}: {out}");
    // The brk calls come from glibc's malloc, built without frame pointers: the stacks reach
    // the leaking function through its CFI (in a debug build the 4 KiB copy may end before
    // the thread's entry: the row is then marked truncated, honestly).
    let biggest = v["callsites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "heap")
        .max_by_key(|c| c["outstanding_bytes"].as_u64())
        .unwrap();
    let frames = biggest["frames"].to_string();
    assert!(
        frames.contains("leak_chunk") && frames.contains("malloc"),
        "{biggest}"
    );
    // System-wide: a process holding regions shows with them.
    let (mut mt, _) = start_vma(&["-d", "4s", "--format", "json", "--top", "0"]);
    let w = Workload::start(&["regions", "10", "8", "0", "8000"], false);
    let out = finish(&mut mt);
    let v = json(&out);
    let mine: Vec<&Value> = callsite_through(&v, "map_regions")
        .into_iter()
        .filter(|c| c["pid"] == w.pid())
        .collect();
    assert_eq!(mine.len(), 1, "{out}");
    assert_eq!(mine[0]["outstanding_bytes"], 10 * 8 * 4096);
}

/// Starts `memtrace vma ARGS` and waits until it is tracing.
fn start_vma(args: &[&str]) -> (Child, String) {
    let mut mt = Command::new(memtrace())
        .arg("vma")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memtrace vma");
    let mut banner = String::new();
    BufReader::new(mt.stderr.as_mut().expect("stderr"))
        .read_line(&mut banner)
        .expect("banner");
    assert!(banner.contains("tracing mappings"), "{banner}");
    (mt, banner)
}

fn finish(mt: &mut Child) -> String {
    use std::io::Read as _;
    let mut out = String::new();
    mt.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = mt.wait().unwrap();
    assert!(status.success(), "{status:?}");
    out
}
