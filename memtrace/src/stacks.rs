//! Stacks as the agent keeps them: raw user stacks interned per process while it lives, kernel
//! stacks interned once for the whole run, and both turned into position-independent frames
//! (module + file offset) once they must outlive the process's address space.
//!
//! Stacks arrive inside fault records (no kernel stack map that can fill up or go stale). A
//! fault that reused a recent walk names it by token; [`ReusedStacks`] resolves those.
use foldhash::HashMap;
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

    /// The index of `ips`, added if new and `budget` (frames that may still be added, shared
    /// by several tables) allows; `None` when the table or the budget is full.
    pub fn intern(&mut self, ips: &[u64], budget: &mut usize) -> Option<u32> {
        if let Some(&i) = self.index.get(ips) {
            return Some(i);
        }
        if self.stacks.len() >= self.limit || ips.len() > *budget {
            return None;
        }
        *budget -= ips.len();
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

    pub fn frames(&self) -> usize {
        self.stacks.iter().map(|s| s.len()).sum()
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
        let mut stack = Self {
            frames: Vec::with_capacity(ips.len()),
            truncated: false,
        };
        stack.resolve_into(space, ips);
        stack
    }

    /// [`UserStack::resolve`] into this stack, reusing its allocation.
    pub fn resolve_into(&mut self, space: &AddressSpace, ips: &[u64]) {
        self.frames.clear();
        self.truncated = false;
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
                    self.truncated = true;
                    return;
                }
            };
            self.frames.push(frame);
        }
    }
}

/// A resolved user stack kept in a [`StackTree`]: a small id, compared and hashed as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackId(u32);

impl StackId {
    /// Its node in the tree.
    pub fn node(self) -> u32 {
        self.0
    }
}

/// What a tree node's frame is in: an index into the tree's modules, or one of these.
const UNMAPPED: u32 = u32::MAX;
/// The outermost node of a truncated stack.
const TRUNCATED: u32 = u32::MAX - 1;

/// One frame of a resolved stack and the node of the frames outside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Node {
    parent: u32,
    module: u32,
    offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Module {
    File(Arc<str>),
    Anon(Arc<str>),
}

/// Nodes a [`StackTree`] holds at most (~40 bytes each).
pub const MAX_TREE_NODES: usize = 1 << 20;

/// Resolved user stacks of the whole run, as a tree from the outermost frame in: stacks
/// that share their outer frames (every stack of a program shares `main` and what calls
/// it) share those nodes, so thousands of exited processes, or 100,000 distinct deep stacks
/// of one, cost a node per distinct frame, not a vector per stack.
#[derive(Debug)]
pub struct StackTree {
    /// Node 0 is the root, the empty stack.
    nodes: Vec<Node>,
    index: HashMap<Node, u32>,
    modules: Vec<Module>,
    module_ids: HashMap<Module, u32>,
    limit: usize,
    /// Nodes right after the last rebuild: all of them were in use then.
    rebuilt_with: usize,
}

impl Default for StackTree {
    fn default() -> Self {
        Self::with_limit(MAX_TREE_NODES)
    }
}

impl StackTree {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            nodes: vec![Node {
                parent: 0,
                module: UNMAPPED,
                offset: 0,
            }],
            index: HashMap::default(),
            modules: Vec::new(),
            module_ids: HashMap::default(),
            limit,
            rebuilt_with: 0,
        }
    }

    fn module_id(&mut self, module: &Module) -> u32 {
        if let Some(&id) = self.module_ids.get(module) {
            return id;
        }
        let id = self.modules.len() as u32;
        self.modules.push(module.clone());
        self.module_ids.insert(module.clone(), id);
        id
    }

    fn child(&mut self, parent: u32, module: u32, offset: u64) -> Option<u32> {
        let node = Node {
            parent,
            module,
            offset,
        };
        if let Some(&id) = self.index.get(&node) {
            return Some(id);
        }
        if self.nodes.len() >= self.limit {
            return None;
        }
        let id = u32::try_from(self.nodes.len()).ok()?;
        self.nodes.push(node);
        self.index.insert(node, id);
        Some(id)
    }

    /// The id of `stack`, added if new; `None` when the tree is full.
    pub fn intern(&mut self, stack: &UserStack) -> Option<StackId> {
        let mut node = 0;
        if stack.truncated {
            node = self.child(node, TRUNCATED, 0)?;
        }
        for frame in stack.frames.iter().rev() {
            let (module, offset) = match frame {
                UserFrame::File { path, offset } => {
                    (self.module_id(&Module::File(path.clone())), *offset)
                }
                UserFrame::Anon { name, offset } => {
                    (self.module_id(&Module::Anon(name.clone())), *offset)
                }
                UserFrame::Unmapped => (UNMAPPED, 0),
            };
            node = self.child(node, module, offset)?;
        }
        Some(StackId(node))
    }

    /// The stack `id` names, innermost frame first.
    pub fn get(&self, id: StackId) -> UserStack {
        let mut stack = UserStack::default();
        self.get_into(id, &mut stack);
        stack
    }

    /// [`StackTree::get`] into `stack`, reusing its allocation.
    pub fn get_into(&self, id: StackId, stack: &mut UserStack) {
        stack.frames.clear();
        stack.truncated = false;
        let mut node = id.0;
        while let Some((parent, frame)) = self.node(node) {
            match frame {
                Some(frame) => stack.frames.push(frame),
                None => stack.truncated = true,
            }
            node = parent;
        }
    }

    /// Node `id`'s parent (the frames outside it) and its frame (`None` for the mark of a
    /// truncated stack); `None` for the root or an id out of range. Parents have smaller ids
    /// than their children.
    pub fn node(&self, id: u32) -> Option<(u32, Option<UserFrame>)> {
        let n = self.nodes.get(id as usize).filter(|_| id != 0)?;
        let frame = match n.module {
            TRUNCATED => None,
            UNMAPPED => Some(UserFrame::Unmapped),
            m => Some(match self.modules.get(m as usize)? {
                Module::File(path) => UserFrame::File {
                    path: path.clone(),
                    offset: n.offset,
                },
                Module::Anon(name) => UserFrame::Anon {
                    name: name.clone(),
                    offset: n.offset,
                },
            }),
        };
        Some((n.parent, frame))
    }

    /// The file frames of the nodes from `from` on: nodes are only ever appended (until the
    /// tree is rebuilt), so a caller can follow the frames new since it last looked.
    pub fn file_frames_from(&self, from: usize) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.nodes
            .get(from..)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| match self.modules.get(n.module as usize) {
                Some(Module::File(path)) => Some((path, n.offset)),
                _ => None,
            })
    }

    /// Nodes held, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// Whether the tree has used most of its room, and has grown enough since it was last
    /// rebuilt for a rebuild (from the stacks still referred to) to be worth its cost: a tree
    /// full of stacks in use is not rebuilt again and again.
    pub fn crowded(&self) -> bool {
        self.nodes.len() > self.limit / 4 * 3
            && self.nodes.len() - self.rebuilt_with > self.limit / 8
    }

    /// A new tree with only the stacks `keep` names, and each kept id's new id. Stacks the
    /// callsites no longer refer to (compacted away) take no room afterwards.
    pub fn rebuilt(
        &self,
        keep: impl IntoIterator<Item = StackId>,
    ) -> (Self, HashMap<StackId, StackId>) {
        let mut tree = Self::with_limit(self.limit);
        let mut ids = HashMap::default();
        let mut stack = UserStack::default();
        for id in keep {
            if ids.contains_key(&id) {
                continue;
            }
            self.get_into(id, &mut stack);
            if let Some(new) = tree.intern(&stack) {
                ids.insert(id, new);
            }
        }
        tree.rebuilt_with = tree.nodes.len();
        (tree, ids)
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
        let mut budget = 100;
        let mut t = StackTable::with_limit(2);
        assert_eq!(t.intern(&[1, 2, 3], &mut budget), Some(0));
        assert_eq!(t.intern(&[1, 2], &mut budget), Some(1));
        assert_eq!(t.intern(&[1, 2, 3], &mut budget), Some(0));
        assert_eq!(t.intern(&[9], &mut budget), None, "full");
        assert_eq!(t.get(1), Some(&[1u64, 2][..]));
        assert_eq!((t.len(), t.frames(), budget), (2, 5, 95));
    }

    #[test]
    fn tables_sharing_a_frame_budget_stop_where_it_ends() {
        let mut budget = 5;
        let (mut a, mut b) = (StackTable::with_limit(10), StackTable::with_limit(10));
        assert_eq!(a.intern(&[1, 2, 3], &mut budget), Some(0));
        assert_eq!(b.intern(&[4, 5, 6], &mut budget), None, "3 frames, 2 left");
        assert_eq!(b.intern(&[4, 5], &mut budget), Some(0));
        assert_eq!(
            a.intern(&[1, 2, 3], &mut budget),
            Some(0),
            "known stacks still resolve"
        );
        assert_eq!(budget, 0);
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
    fn stacks_share_their_outer_frames_and_come_back_whole() {
        let file = |offset| UserFrame::File {
            path: Arc::from("/bin/app"),
            offset,
        };
        let stack = |frames: Vec<UserFrame>, truncated| UserStack { frames, truncated };
        let mut tree = StackTree::with_limit(8);
        // Innermost first: both end in main (0x10) <- start (0x1).
        let a = stack(vec![file(0x30), file(0x10), file(0x1)], false);
        let b = stack(vec![file(0x40), file(0x10), file(0x1)], false);
        let ia = tree.intern(&a).unwrap();
        let ib = tree.intern(&b).unwrap();
        assert_ne!(ia, ib);
        assert_eq!(tree.intern(&a), Some(ia), "equal stacks, one id");
        assert_eq!(tree.len(), 1 + 4, "root, start, main and the two leaves");
        assert_eq!((tree.get(ia), tree.get(ib)), (a.clone(), b.clone()));
        // Truncated and unmapped frames keep their meaning.
        let c = stack(
            vec![
                UserFrame::Unmapped,
                UserFrame::Anon {
                    name: Arc::from("[vdso]"),
                    offset: 0x5,
                },
            ],
            true,
        );
        let ic = tree.intern(&c).unwrap();
        assert_eq!(tree.get(ic), c);
        assert_eq!(tree.get(StackId(0)), UserStack::default());
        // Full: a new stack is refused, known ones still resolve.
        assert_eq!(tree.len(), 8);
        assert_eq!(tree.intern(&stack(vec![file(0x99)], false)), None);
        assert_eq!(tree.intern(&b), Some(ib));
        // Rebuilt with only b: a's leaf and c's nodes are gone.
        assert!(tree.crowded());
        let (small, ids) = tree.rebuilt([ib]);
        assert_eq!(small.len(), 4);
        assert_eq!(small.get(ids[&ib]), b);
        // Rebuilt with every stack still in use: as full as before, and not crowded again
        // until it grows (no rebuild at every sweep).
        let (same, _) = tree.rebuilt([ia, ib, ic]);
        assert_eq!(same.len(), 8);
        assert!(!same.crowded());
    }
}
