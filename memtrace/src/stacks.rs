//! Stacks as the agent keeps them: raw user stacks interned per process while it lives, kernel
//! stacks interned once for the whole run, and both turned into position-independent frames
//! (module + file offset) once they must outlive the process's address space.
//!
//! Stacks arrive inside fault records (no kernel stack map that can fill up or go stale). A
//! fault that reused a recent walk names it by token; [`ReusedStacks`] resolves those.
use foldhash::{HashMap, HashSet};
use std::sync::Arc;

use memtrace_common::stack_token_slot;

use crate::addrspace::AddressSpace;

/// Raw stacks (innermost first) interned to small indices: a fault loop repeats one stack
/// millions of times and its callsite key then holds a `u32`, not the frames.
#[derive(Debug, Default)]
pub struct StackTable {
    index: HashMap<Arc<[u64]>, u32>,
    stacks: Vec<Arc<[u64]>>,
    limit: usize,
}

impl StackTable {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// The index of `ips`, added if new; `None` when the table is full.
    pub fn intern(&mut self, ips: &[u64]) -> Option<u32> {
        if let Some(&i) = self.index.get(ips) {
            return Some(i);
        }
        if self.stacks.len() >= self.limit {
            return None;
        }
        let i = u32::try_from(self.stacks.len()).ok()?;
        let stack: Arc<[u64]> = Arc::from(ips);
        self.stacks.push(stack.clone());
        self.index.insert(stack, i);
        Some(i)
    }

    pub fn get(&self, i: u32) -> Option<&[u64]> {
        self.stacks.get(i as usize).map(|s| &s[..])
    }

    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }
}

/// The last walk seen in each (cpu, stack-cache slot), so a fault that reused it can be given
/// its stack. Bounded by CPUs x slots.
#[derive(Debug, Default)]
pub struct ReusedStacks {
    slots: HashMap<(u32, u32), (u64, u32, Option<u32>)>,
}

impl ReusedStacks {
    /// A walk under `token` by process `pid`, interned as `stack`.
    pub fn walked(&mut self, token: u64, pid: u32, stack: Option<u32>) {
        self.slots
            .insert(stack_token_slot(token), (token, pid, stack));
    }

    /// The stack of the walk `token` names, if that walk was seen for this process.
    pub fn resolve(&self, token: u64, pid: u32) -> Option<u32> {
        match self.slots.get(&stack_token_slot(token)) {
            Some(&(t, p, stack)) if t == token && p == pid => stack,
            _ => None,
        }
    }

    /// Forgets the walks of a process whose stack table is being dropped.
    pub fn forget(&mut self, pid: u32) {
        self.slots.retain(|_, (_, p, _)| *p != pid);
    }
}

/// One user frame, independent of where the module was loaded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UserFrame {
    /// Code in a file: symbolized by (path, file offset).
    File { path: Arc<str>, offset: u64 },
    /// Executable memory without a file (`[vdso]`, JIT code): the offset from the mapping's
    /// start, which, unlike the address, is the same in every process.
    Anon { name: Arc<str>, offset: u64 },
    /// The faulting instruction outside every known executable mapping. Its address is not
    /// kept: it means nothing once the process is gone, and it would keep apart callsites of
    /// processes that differ only in where ASLR put them.
    Unmapped,
}

/// A user stack in position-independent frames, innermost first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserStack {
    pub frames: Vec<UserFrame>,
    /// The walk left executable memory (code without frame pointers handed the unwinder a
    /// non-code return address): the frames stop there.
    pub truncated: bool,
}

impl UserStack {
    /// Resolves raw return addresses through a process's address space. Every frame but the
    /// first is a return address, looked up at the call instruction before it. A return
    /// address outside executable memory is garbage from code without frame pointers (ASCII
    /// bytes, stack data); the stack is cut there and marked truncated.
    pub fn resolve(space: &AddressSpace, ips: &[u64]) -> Self {
        let mut frames = Vec::with_capacity(ips.len());
        for (i, &ip) in ips.iter().enumerate() {
            let lookup = if i == 0 { ip } else { ip.saturating_sub(1) };
            let frame = match space.find(lookup).filter(|v| v.exec) {
                Some(vma) => match vma.path.as_ref() {
                    Some(path) if path.starts_with('/') => UserFrame::File {
                        path: path.clone(),
                        offset: vma.file_offset(lookup),
                    },
                    other => UserFrame::Anon {
                        name: other.cloned().unwrap_or_else(|| Arc::from("[anon]")),
                        offset: lookup - vma.start,
                    },
                },
                None if i == 0 => UserFrame::Unmapped,
                None => {
                    return Self {
                        frames,
                        truncated: true,
                    }
                }
            };
            frames.push(frame);
        }
        Self {
            frames,
            truncated: false,
        }
    }
}

/// A user stack from [`UserStackSet::intern`]: one allocation per distinct stack, so it is
/// compared and hashed by address, not by its frames (callsite tables hash their keys often).
#[derive(Clone, Debug)]
pub struct SharedStack(Arc<UserStack>);

impl SharedStack {
    /// A stack outside the set, for a report's one-off use: equal only to its own clones.
    pub fn standalone(stack: UserStack) -> Self {
        Self(Arc::new(stack))
    }
}

impl PartialEq for SharedStack {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedStack {}

impl std::hash::Hash for SharedStack {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

impl std::ops::Deref for SharedStack {
    type Target = UserStack;
    fn deref(&self) -> &UserStack {
        &self.0
    }
}

/// Interns resolved user stacks for the whole run: thousands of exited processes of one
/// program share their stacks.
#[derive(Debug, Default)]
pub struct UserStackSet(HashSet<Arc<UserStack>>);

impl UserStackSet {
    pub fn intern(&mut self, stack: UserStack) -> SharedStack {
        if let Some(s) = self.0.get(&stack) {
            return SharedStack(s.clone());
        }
        let s = Arc::new(stack);
        self.0.insert(s.clone());
        SharedStack(s)
    }

    /// Drops stacks nothing else refers to any more.
    pub fn prune(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrace_common::stack_token;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 r-xp 00001000 08:01 1234 /usr/bin/demo
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000300000-7f0000400000 r-xp 00010000 08:01 98 /usr/lib/libc.so.6
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn interns_stacks_up_to_a_limit() {
        let mut t = StackTable::with_limit(2);
        assert_eq!(t.intern(&[1, 2, 3]), Some(0));
        assert_eq!(t.intern(&[1, 2]), Some(1));
        assert_eq!(t.intern(&[1, 2, 3]), Some(0));
        assert_eq!(t.intern(&[9]), None, "full");
        assert_eq!(t.get(1), Some(&[1u64, 2][..]));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn reused_stacks_resolve_only_their_own_walk() {
        let mut r = ReusedStacks::default();
        let t1 = stack_token(1, 5, 10);
        r.walked(t1, 100, Some(3));
        assert_eq!(r.resolve(t1, 100), Some(3));
        assert_eq!(r.resolve(t1, 101), None, "another process");
        // A later walk in the same slot replaces the earlier one.
        let t2 = stack_token(1, 5, 11);
        r.walked(t2, 100, Some(4));
        assert_eq!(r.resolve(t1, 100), None);
        assert_eq!(r.resolve(t2, 100), Some(4));
        r.forget(100);
        assert_eq!(r.resolve(t2, 100), None);
    }

    #[test]
    fn resolves_frames_and_cuts_at_non_code() {
        let space = AddressSpace::from_maps(MAPS);
        let ips = [
            0x55d0c0a00100,        // demo, the faulting instruction
            0x7f0000300051,        // libc return address
            0x7ffc00100011,        // vdso
            0x3732_3835_3630_3030, // ASCII read as a return address
            0x55d0c0a00200,        // never reached
        ];
        let s = UserStack::resolve(&space, &ips);
        assert!(s.truncated);
        assert_eq!(
            s.frames,
            vec![
                UserFrame::File {
                    path: Arc::from("/usr/bin/demo"),
                    offset: 0x1100
                },
                UserFrame::File {
                    path: Arc::from("/usr/lib/libc.so.6"),
                    offset: 0x10050
                },
                UserFrame::Anon {
                    name: Arc::from("[vdso]"),
                    offset: 0x10
                },
            ]
        );
        // A return address into the heap (not executable) is cut too.
        let heap = UserStack::resolve(&space, &[0x55d0c0a00100, 0x55d0c1000010]);
        assert!(heap.truncated && heap.frames.len() == 1);
        // The faulting instruction itself is kept even when unknown.
        let unknown = UserStack::resolve(&space, &[0x1000]);
        assert_eq!(unknown.frames, vec![UserFrame::Unmapped]);
        assert!(!unknown.truncated);
    }

    #[test]
    fn equal_stacks_of_different_processes_share_one_copy() {
        let mut set = UserStackSet::default();
        let a = set.intern(UserStack::default());
        let b = set.intern(UserStack::default());
        assert_eq!(a, b, "one copy, equal by address");
        let c = set.intern(UserStack {
            frames: vec![UserFrame::Unmapped],
            truncated: false,
        });
        assert_ne!(a, c);
        drop(c);
        drop((a, b));
        set.prune();
        assert!(set.is_empty());
    }
}
