//! `perf_event_open(2)` for what aya does not offer: the side-band's dummy event, and sampling
//! software events the agent opens, closes and re-periods while it runs.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

// Kernel ABI (include/uapi/linux/perf_event.h).
pub const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `attr.flags` bit: start disabled.
const ATTR_DISABLED: u64 = 1 << 0;
// ioctl requests: _IO('$', 0), _IOW('$', 4, u64), _IOW('$', 8, u32).
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_PERIOD: libc::c_ulong = 0x4008_2404;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// `struct perf_event_attr` as of PERF_ATTR_SIZE_VER8; older kernels accept it as long as the
/// fields they do not know are zero.
#[repr(C)]
#[derive(Default)]
pub struct PerfEventAttr {
    pub kind: u32,
    pub size: u32,
    pub config: u64,
    pub sample_period: u64,
    pub sample_type: u64,
    pub read_format: u64,
    pub flags: u64,
    pub wakeup_watermark: u32,
    pub bp_type: u32,
    pub config1: u64,
    pub config2: u64,
    pub branch_sample_type: u64,
    pub sample_regs_user: u64,
    pub sample_stack_user: u32,
    pub clockid: i32,
    pub sample_regs_intr: u64,
    pub aux_watermark: u32,
    pub sample_max_stack: u16,
    pub reserved_2: u16,
    pub aux_sample_size: u32,
    pub reserved_3: u32,
    pub sig_data: u64,
    pub config3: u64,
}

/// Opens an event for every process on `cpu`.
pub fn open_on_cpu(attr: &PerfEventAttr, cpu: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: a valid, fully initialized attr that outlives the call; pid -1 with a CPU means
    // every process on that CPU; no group; the flags are valid.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr as *const PerfEventAttr,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: `fd` is an open perf event; each request used here takes an integer or a
    // pointer to a u64 that outlives the call (see the callers).
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A software event on every CPU that runs a BPF program on one event in `period`, with a
/// period the agent may change while it runs (aya's attach does not hand out the perf fds).
pub struct SampledEvent {
    fds: Vec<OwnedFd>,
}

impl SampledEvent {
    /// Opens `PERF_COUNT_SW_*` number `config` on each CPU with `period`, and runs `prog_fd`
    /// (a loaded perf-event program) on each overflow, until dropped.
    pub fn attach(
        config: u64,
        period: u64,
        cpus: &[u32],
        prog_fd: std::os::fd::RawFd,
    ) -> std::io::Result<Self> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config,
            sample_period: period,
            flags: ATTR_DISABLED,
            ..PerfEventAttr::default()
        };
        let mut fds = Vec::with_capacity(cpus.len());
        for &cpu in cpus {
            let fd = open_on_cpu(&attr, cpu)?;
            ioctl(&fd, PERF_EVENT_IOC_SET_BPF, prog_fd as libc::c_ulong)?;
            ioctl(&fd, PERF_EVENT_IOC_ENABLE, 0)?;
            fds.push(fd);
        }
        Ok(Self { fds })
    }

    /// Sets the period of every CPU's event (from its next overflow on).
    pub fn set_period(&self, period: u64) -> std::io::Result<()> {
        for fd in &self.fds {
            ioctl(
                fd,
                PERF_EVENT_IOC_PERIOD,
                &period as *const u64 as libc::c_ulong,
            )?;
        }
        Ok(())
    }
}
