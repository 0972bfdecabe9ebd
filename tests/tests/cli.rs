//! `memtrace faults` at its edges, run as a user would run it: signals, exit codes, output that
//! goes away or fills up, `-o`, JSON Lines, bad durations and sizes, `-p` given a thread, a
//! kernel thread or a pid that gets reused, and capabilities instead of root. Needs root.
use std::{
    io::Read as _,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

mod common;
use common::{memtrace, require_root, start_memtrace, workload};

/// A process that takes no faults worth counting and stays until killed.
struct Sleeper(Child);

impl Sleeper {
    fn start() -> Self {
        let child = Command::new(workload())
            .args(["sleep", "60000"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the sleeping workload");
        Self(child)
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs memtrace to its end: (exit code, stdout, stderr); never a panic.
fn run(args: &[&str]) -> (i32, String, String) {
    require_root();
    let out = Command::new(memtrace())
        .args(args)
        .output()
        .expect("run memtrace");
    texts(&out)
}

fn texts(out: &Output) -> (i32, String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}

fn signal(child: &Child, signal: i32) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory arguments; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill");
}

/// Waits for `child`, collecting what is left of its output: (output, time it took).
fn finish(child: Child) -> (Output, Duration) {
    let t = Instant::now();
    let out = child.wait_with_output().expect("wait for memtrace");
    (out, t.elapsed())
}

#[test]
fn sigterm_and_sigint_end_the_run_with_its_final_report() {
    let sleeper = Sleeper::start();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mt, _) = start_memtrace(
            &["faults", "-d", "60s", "-p", &sleeper.pid()],
            Stdio::piped(),
        );
        signal(&mt, sig);
        let (out, took) = finish(mt);
        let (code, stdout, stderr) = texts(&out);
        assert_eq!(code, 0, "signal {sig}: {stderr}");
        assert!(
            stdout.contains("memtrace faults:"),
            "signal {sig}: {stdout}"
        );
        assert!(took < Duration::from_secs(2), "signal {sig}: took {took:?}");
    }
}

#[test]
fn a_command_still_running_at_the_end_is_not_orphaned() {
    // `-d` (or SIGTERM from systemd, timeout, kill) ends the run: the command gets SIGTERM
    // instead of living on under init.
    let started = Instant::now();
    let (code, _, stderr) = run(&["faults", "-d", "300ms", "--", "sleep", "30"]);
    assert!(started.elapsed() < Duration::from_secs(5), "{stderr}");
    assert_eq!(code, 143, "killed by SIGTERM: {stderr}");
    let pid: u32 = stderr
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stderr}"));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sleep {pid} outlived the run"
    );
}

#[test]
fn a_second_signal_ends_memtrace_at_once() {
    let sleeper = Sleeper::start();
    for (sig, expected) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let (mt, _) = start_memtrace(
            &["faults", "-d", "60s", "-p", &sleeper.pid()],
            Stdio::piped(),
        );
        signal(&mt, sig);
        // The final report waits 50 ms for records in flight: this lands while it is prepared.
        std::thread::sleep(Duration::from_millis(5));
        signal(&mt, sig);
        let (out, took) = finish(mt);
        let (code, _, stderr) = texts(&out);
        assert_eq!(code, expected, "signal {sig}: {stderr}");
        assert!(took < Duration::from_secs(2), "signal {sig}: took {took:?}");
    }
}

#[test]
fn the_command_status_is_the_exit_status() {
    let (code, _, stderr) = run(&["faults", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code, 7, "{stderr}");
    // Killed by a signal: 128 + the signal, as a shell says.
    let (code, _, stderr) = run(&["faults", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code, 143, "{stderr}");
}

#[test]
fn commands_that_cannot_run_and_conflicting_targets_keep_their_codes() {
    let file = std::env::temp_dir().join(format!("memtrace-cli-{}-noexec", std::process::id()));
    std::fs::write(&file, "#!/bin/sh\n").expect("write a non-executable file");
    let path = file.to_str().expect("UTF-8 path");
    let (code, _, stderr) = run(&["faults", "--", path]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 126, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot start {path}")) && stderr.contains("not executable"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["faults", "--", "/"]);
    assert_eq!(code, 126, "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    let (code, _, stderr) = run(&["faults", "-p", "1", "--", "true"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn a_closed_stdout_pipe_ends_the_run_quietly() {
    let sleeper = Sleeper::start();
    let (mut mt, _) = start_memtrace(
        &["faults", "-i", "100ms", "-d", "20s", "-p", &sleeper.pid()],
        Stdio::piped(),
    );
    // Like `| head -c 10`: read a little, then go away.
    let mut first = [0u8; 10];
    let mut stdout = mt.stdout.take().expect("stdout");
    stdout.read_exact(&mut first).expect("the first report");
    drop(stdout);
    let (out, took) = finish(mt);
    let (code, _, stderr) = texts(&out);
    assert!(code == 141 || code == 0, "exit {code}: {stderr}");
    assert!(stderr.trim().is_empty(), "no messages expected: {stderr}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn a_full_disk_is_a_clear_error() {
    let sleeper = Sleeper::start();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = Command::new(memtrace())
        .args(["faults", "-d", "300ms", "-p", &sleeper.pid()])
        .stdout(full)
        .output()
        .expect("run memtrace");
    let (code, _, stderr) = texts(&out);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("writing the report: No space left on device"),
        "{stderr}"
    );
}

#[test]
fn output_file_holds_the_report_and_stdout_the_command() {
    let file = std::env::temp_dir().join(format!("memtrace-cli-{}-r.json", std::process::id()));
    let path = file.to_str().expect("UTF-8 path");
    let (code, stdout, stderr) = run(&[
        "faults", "--format", "json", "-o", path, "--", "echo", "hello",
    ]);
    let text = std::fs::read_to_string(&file).expect("the report file");
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "hello\n");
    let report: Value = serde_json::from_str(&text).expect("valid JSON in the report file");
    assert_eq!(report["report"], "final", "{text}");
    assert!(report["processes"].is_array(), "{text}");
}

#[test]
fn json_with_intervals_is_one_document_per_line() {
    let sleeper = Sleeper::start();
    let (code, stdout, stderr) = run(&[
        "faults",
        "--format",
        "json",
        "-i",
        "200ms",
        "-d",
        "1100ms",
        "-p",
        &sleeper.pid(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let docs: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(docs.len() >= 3, "{stdout}");
    let (last, intervals) = docs.split_last().expect("documents");
    assert_eq!(last["report"], "final");
    assert!(
        intervals.iter().all(|d| d["report"] == "interval"),
        "{stdout}"
    );
}

#[test]
fn interval_reports_hold_their_interval_and_the_final_one_the_run() {
    let wl = workload();
    let wl = wl.to_str().unwrap();
    let script = format!("{wl} anon 20000; sleep 1; {wl} anon 20000; sleep 1; {wl} anon 20000");
    let (code, stdout, stderr) = run(&[
        "faults", "--format", "json", "-i", "250ms", "--", "sh", "-c", &script,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let docs: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let (last, intervals) = docs.split_last().expect("documents");
    assert_eq!(last["scope"], "total", "{last}");
    // At least two, even where a slow report (a loaded machine, a debug build symbolizing its
    // own DWARF) makes the loop skip ticks.
    assert!(intervals.len() >= 2, "{stdout}");
    assert!(intervals.iter().all(|d| d["scope"] == "interval"));
    let minor = |d: &Value| d["minor"].as_u64().unwrap();
    let total = minor(last);
    let summed: u64 = intervals.iter().map(minor).sum();
    // Running totals would add up to several times the total; intervals add up to at most it.
    assert!(total >= 60_000, "total {total}");
    assert!(summed <= total, "intervals sum to {summed}, total {total}");
    assert!(summed >= 20_000, "intervals sum to {summed}");
    let busiest = intervals.iter().map(minor).max().unwrap();
    assert!(busiest < total / 2, "an interval of {busiest} of {total}");
}

#[test]
fn bad_durations_and_ring_sizes_are_usage_errors() {
    for (args, says) in [
        (&["-i", "0"][..], "greater than zero"),
        (&["-d", "0"], "greater than zero"),
        (&["-d", "0ms"], "greater than zero"),
        (&["-d=-1s"], "greater than zero"),
        (&["-d", "99999999999999999999h"], "too long"),
        (&["-i", "0.1ms"], "too short"),
        (&["--ringbuf-mb", "4096"], "power of two from 1 to 1024"),
        (&["--ringbuf-mb", "3"], "power of two from 1 to 1024"),
        (&["--ringbuf-mb", "0"], "power of two from 1 to 1024"),
    ] {
        let mut all = vec!["faults"];
        all.extend_from_slice(args);
        let (code, _, stderr) = run(&all);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn the_deadline_wins_over_interval_reports_slower_than_the_interval() {
    // The whole system, so a report takes longer than -i (the first one far longer).
    let (mt, _) = start_memtrace(
        &[
            "faults", "--format", "json", "-i", "1ms", "-d", "1s", "--top", "1",
        ],
        Stdio::piped(),
    );
    let (out, took) = finish(mt);
    let (code, stdout, stderr) = texts(&out);
    assert_eq!(code, 0, "{stderr}");
    let last = stdout.lines().last().expect("a final report");
    let last: Value = serde_json::from_str(last).expect("JSON");
    assert_eq!(last["report"], "final");
    // Reports that queued up behind each other once made this run take ~50 s. Now the run
    // ends within a drain (50 ms) of the deadline, unless a report was already being built:
    // the first one symbolizes cold, over a second in a debug build on two busy CPUs.
    let traced = last["duration_s"].as_f64().expect("duration_s");
    assert!(traced < 3.0, "traced for {traced} s");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn a_thread_id_traces_its_process() {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        tid_tx.send(tid).expect("send tid");
        let _ = done_rx.recv();
    });
    let tid = tid_rx.recv().expect("thread id").to_string();
    let (code, _, stderr) = run(&["faults", "-d", "300ms", "-p", &tid]);
    drop(done_tx);
    thread.join().expect("thread");
    let pid = std::process::id();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pid {tid} is a thread of process {pid}; tracing process {pid}"
        )),
        "{stderr}"
    );
}

#[test]
fn a_kernel_thread_is_refused() {
    // kthreadd is pid 2 on every Linux outside a pid namespace.
    let stat = std::fs::read_to_string("/proc/2/stat").unwrap_or_default();
    if !stat.contains("(kthreadd)") {
        eprintln!("skipped: pid 2 is not kthreadd here");
        return;
    }
    let (code, _, stderr) = run(&["faults", "-d", "1s", "-p", "2"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("pid 2 is a kernel thread"), "{stderr}");
}

/// Starts a sleeper that gets pid `pid` (free) by setting the kernel's last allocated pid.
fn sleeper_with_pid(pid: u32) -> Option<Sleeper> {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
    let sleeper = Sleeper::start();
    (sleeper.0.id() == pid).then_some(sleeper)
}

#[test]
fn a_reused_pid_does_not_keep_the_run_going() {
    // Other tests start processes too, and may take the pid first: try a few times.
    for _ in 0..5 {
        let mut first = Sleeper::start();
        let pid = first.0.id();
        let (mt, _) = start_memtrace(
            &["faults", "-d", "20s", "-p", &pid.to_string()],
            Stdio::piped(),
        );
        let _ = first.0.kill();
        let _ = first.0.wait();
        let Some(_second) = sleeper_with_pid(pid) else {
            let mut mt = mt;
            let _ = mt.kill();
            let _ = mt.wait();
            continue;
        };
        // A new process now has the pid: memtrace must still see that its process exited.
        let (out, took) = finish(mt);
        let (code, stdout, stderr) = texts(&out);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("memtrace faults:"), "{stdout}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        return;
    }
    eprintln!("skipped: could not get the same pid again");
}

#[test]
fn capabilities_not_the_uid_decide() {
    require_root();
    // Nobody, with CAP_BPF and CAP_PERFMON: not refused as "not root" (what follows depends on
    // what else nobody may do here, such as reading tracefs).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+bpf,+perfmon",
            "--ambient-caps=+bpf,+perfmon",
        ])
        .arg(memtrace())
        .args(["faults", "-d", "300ms"])
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: no setpriv");
        return;
    };
    let (code, _, stderr) = texts(&out);
    if stderr.starts_with("setpriv:") {
        eprintln!("skipped: {stderr}");
        return;
    }
    assert_ne!(code, 77, "{stderr}");
    assert!(!stderr.contains("needs root"), "{stderr}");
    // tracefs is mounted (the run as root made sure): what stops nobody is reading it, and
    // the message says that, not "not mounted".
    if code != 0 {
        assert!(!stderr.contains("not mounted"), "{stderr}");
    }
    // The same user without them is refused.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(memtrace())
        .args(["faults", "-d", "300ms"])
        .output()
        .expect("setpriv");
    let (code, _, stderr) = texts(&out);
    assert_eq!(code, 77, "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
}
