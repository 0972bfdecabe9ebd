//! tracefs: finding (or mounting) it, and reading tracepoint format files so the offsets the
//! kernel programs were compiled with can be checked against the running kernel.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use crate::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// The tracefs mount point, mounting it at /sys/kernel/tracing when nothing is mounted.
pub fn ensure_mounted() -> Result<PathBuf, Error> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    // Mounted, but closed to this user (tracefs is mode 700: CAP_BPF + CAP_PERFMON alone do not
    // open it): mounting again would fail and mislead.
    if let Some(mounted) = tracefs_mount_point() {
        if let Err(e) = std::fs::read_dir(mounted.join("events")) {
            return Err(Error::Tracefs(format!(
                "mounted at {} but memtrace cannot read it ({e}): run as root, or give this user \
                 access to it (e.g. CAP_DAC_READ_SEARCH)",
                mounted.display()
            )));
        }
        return Ok(mounted);
    }
    let target = CString::new(TRACEFS).map_err(|_| Error::Tracefs("bad path".into()))?;
    let fstype = CString::new("tracefs").map_err(|_| Error::Tracefs("bad fstype".into()))?;
    let source = CString::new("nodev").map_err(|_| Error::Tracefs("bad source".into()))?;
    // SAFETY: all three pointers are valid NUL-terminated strings that outlive the call; a null
    // data pointer is allowed.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 || !Path::new(TRACEFS).join("events").is_dir() {
        let err = std::io::Error::last_os_error();
        return Err(Error::Tracefs(format!(
            "tracefs is not mounted and mounting it failed ({err}); run: mount -t tracefs nodev {TRACEFS}"
        )));
    }
    Ok(PathBuf::from(TRACEFS))
}

/// Where tracefs is mounted, from /proc/self/mountinfo (mount point is field 5; the
/// filesystem type follows the " - " separator).
fn tracefs_mount_point() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_point_of(&mountinfo, "tracefs")
}

fn mount_point_of(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == fstype)
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// One field of a tracepoint format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Parses the `field:` lines of a tracepoint `format` file.
pub fn parse_format(text: &str) -> Vec<FormatField> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?;
            let mut parts = decl.split(';').map(str::trim);
            let decl = parts.next()?;
            let mut offset = None;
            let mut size = None;
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            // The name is the last identifier of the declaration, before any array suffix.
            let name = decl
                .split_whitespace()
                .last()?
                .split('[')
                .next()?
                .to_string();
            Some(FormatField {
                name,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

pub fn tracepoint_exists(tracefs: &Path, category: &str, name: &str) -> bool {
    tracefs.join("events").join(category).join(name).is_dir()
}

pub fn read_format(tracefs: &Path, category: &str, name: &str) -> Result<Vec<FormatField>, Error> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::MissingTracepoint {
        tracepoint: format!("{category}:{name}"),
        reason: e.to_string(),
    })?;
    Ok(parse_format(&text))
}

/// Checks the fields a classic-tracepoint program reads from this tracepoint's record against
/// this kernel's format file: a wrong offset would read another field silently.
pub fn check_tracepoint_layout(tracefs: &Path, category: &str, name: &str) -> Result<(), Error> {
    let checked = memtrace_common::layout::CHECKED
        .iter()
        .filter(|(c, n, _)| *c == category && *n == name);
    let mut fields = None;
    for (_, _, (field, offset, size)) in checked {
        let fields = match &fields {
            Some(f) => f,
            None => fields.insert(read_format(tracefs, category, name)?),
        };
        match fields.iter().find(|f| f.name == *field) {
            Some(f) if f.offset == *offset && f.size == *size => {}
            other => {
                return Err(Error::LayoutMismatch {
                    tracepoint: format!("{category}:{name}"),
                    field: field.to_string(),
                    expected: format!("offset {offset} size {size}"),
                    found: other.map_or("absent".into(), |f| {
                        format!("offset {} size {}", f.offset, f.size)
                    }),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tracefs_mount_point() {
        let mountinfo = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
            35 24 0:12 / /sys/kernel/tracing rw,nosuid,nodev shared:16 - tracefs nodev rw\n";
        assert_eq!(
            mount_point_of(mountinfo, "tracefs"),
            Some(PathBuf::from("/sys/kernel/tracing"))
        );
        assert_eq!(mount_point_of(mountinfo, "debugfs"), None);
    }

    #[test]
    fn parses_format_fields() {
        let text = "name: page_fault_user\nID: 190\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\
\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\
\nprint fmt: \"address=%ps\", REC->address\n";
        let f = parse_format(text);
        let names: Vec<_> = f
            .iter()
            .map(|f| (f.name.as_str(), f.offset, f.size))
            .collect();
        assert_eq!(
            names,
            vec![
                ("common_type", 0, 2),
                ("common_pid", 4, 4),
                ("address", 8, 8),
                ("comm", 12, 16),
                ("filename", 8, 4),
            ]
        );
    }
}
