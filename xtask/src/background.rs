//! A tracer running in the background during a benchmark run: started, waited for until it
//! says it is attached, and stopped with SIGINT for its final report.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Where a tracer says it has attached: memtrace on stderr, bpftrace on stdout.
#[derive(Clone, Copy)]
pub enum Banner {
    Stderr,
    Stdout,
}

pub struct Background {
    child: Child,
}

impl Background {
    /// Starts `cmd` and waits for its first line on `banner`.
    pub fn start(mut cmd: Command, banner: Banner) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let mut line = String::new();
        match banner {
            Banner::Stderr => {
                BufReader::new(child.stderr.as_mut().context("stderr")?).read_line(&mut line)?
            }
            Banner::Stdout => {
                BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?
            }
        };
        if line.is_empty() {
            bail!("the tracer exited before attaching");
        }
        Ok(Self { child })
    }

    /// Stops it with SIGINT; returns its stdout (memtrace's final report).
    pub fn stop(mut self) -> Result<String> {
        // SAFETY: kill takes a pid and a signal by value; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        self.child.wait()?;
        Ok(out)
    }
}

/// What runs beside a benchmark's workload.
#[derive(Clone, Copy)]
pub enum Tracer {
    None,
    /// `memtrace` with these arguments (the subcommand and its flags).
    Memtrace(&'static [&'static str]),
    /// bpftrace with this script, and these environment variables.
    Bpftrace(&'static str, &'static [(&'static str, &'static str)]),
}

/// Starts `tracer` system-wide (none for `Tracer::None`) and waits until it is attached.
pub fn start(bin: &Path, tracer: Tracer) -> Result<Option<Background>> {
    let (mut cmd, banner) = match tracer {
        Tracer::None => return Ok(None),
        Tracer::Memtrace(args) => {
            let mut c = Command::new(bin.join("memtrace"));
            c.args(args).args(["--format", "json", "--top", "3"]);
            (c, Banner::Stderr)
        }
        Tracer::Bpftrace(script, env) => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", script]).envs(env.iter().copied());
            (c, Banner::Stdout)
        }
    };
    cmd.stdin(Stdio::null());
    Background::start(cmd, banner).map(Some)
}
