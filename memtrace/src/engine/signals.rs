//! SIGINT and SIGTERM: the first ends a run with its final report, a second ends the process.
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// The first SIGINT or SIGTERM of the run (0 until one comes), and how many have come.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOP_SIGNALS_SEEN: AtomicU32 = AtomicU32::new(0);

/// SIGINT/SIGTERM handler. The first signal asks the run to end with its final report; a later
/// one means the user will not wait for that report, and ends the process at once with the
/// shell's code for the signal (130 for SIGINT, 143 for SIGTERM).
extern "C" fn on_stop_signal(signal: libc::c_int) {
    if STOP_SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) == 0 {
        STOP_SIGNAL.store(signal, Ordering::SeqCst);
    } else {
        // SAFETY: _exit is async-signal-safe; the kernel drops the eBPF programs with our fds.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Makes SIGINT and SIGTERM end a run gracefully (see [`on_stop_signal`]). The handler stays
/// after the run, so a second signal while the caller writes the final report ends the process.
pub fn install_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: all-zero is a valid sigaction (no flags, empty mask); its fields are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: both calls get valid pointers to our own sigaction; the handler only touches
        // atomics and calls _exit, which are async-signal-safe.
        let rc = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            log::warn!(
                "cannot handle signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The signal that asked the run to end, if one has.
pub fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}
