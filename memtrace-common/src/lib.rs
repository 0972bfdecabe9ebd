//! Types shared by the kernel programs and the agent.
//!
//! Every record is `#[repr(C)]`, sized to a multiple of 8 and laid out without implicit padding,
//! so the two sides agree byte for byte. The first `u32` of every ring-buffer record is its
//! [`RecordKind`], which is how the agent tells them apart.
#![no_std]

/// Tag in the first four bytes of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Fault = 1,
    Vma = 2,
    Proc = 3,
    SlabStack = 4,
    FaultBatch = 5,
}

impl RecordKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Fault),
            2 => Some(Self::Vma),
            3 => Some(Self::Proc),
            4 => Some(Self::SlabStack),
            5 => Some(Self::FaultBatch),
            _ => None,
        }
    }
}

/// `FaultRecord::flags`: the kernel accounted the fault as major (it needed I/O).
pub const FAULT_MAJOR: u32 = 1 << 0;
/// `FaultRecord::flags`: the fault was taken in kernel mode (copy_from_user and the like).
pub const FAULT_KERNEL_MODE: u32 = 1 << 1;
/// `FaultRecord::flags`: `latency_ns` and `error_code` are valid (the fault's entry was seen).
pub const FAULT_HAS_ENTRY: u32 = 1 << 2;
/// `FaultRecord::flags`: stacks were captured for this fault: its frames follow the record
/// (`n_user` user frames, then `n_kernel` kernel frames). `stack_token` names the user stack
/// for later faults that reuse it.
pub const FAULT_STACK_WALKED: u32 = 1 << 3;
/// `FaultRecord::flags`: the user stack was not walked; it is the one last walked under
/// `stack_token` (a fault at the same instruction, frame and stack pointer).
pub const FAULT_STACK_REUSED: u32 = 1 << 4;
/// `FaultRecord::flags`: `sp_words` holds the words at the user stack pointer (read with the
/// walk of a user-mode fault), from which the agent recovers a frameless leaf's caller.
pub const FAULT_SP_WORDS: u32 = 1 << 5;

/// Words read at the user stack pointer of a walked user-mode fault: a function that has not
/// set up a frame-pointer frame has its return address at `[rsp]` (nothing pushed yet) or
/// `[rsp + 8]` (after `push rbp`), where the frame-pointer walk cannot see it.
pub const SP_WORDS: usize = 2;

/// `FaultRecord::flags`: sent at the fault's entry, before the kernel handled it: whether and
/// how the kernel accounted it follows from `thread_faults` of the thread's next record (and
/// from a completion, [`FAULT_COMPLETION`], when one is sent for it).
pub const FAULT_AT_ENTRY: u32 = 1 << 6;

/// A page fault, emitted when the kernel accounts it as major or minor. A record with
/// `FAULT_STACK_WALKED` is followed in the ring buffer by its `n_user + n_kernel` frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultRecord {
    pub kind: u32,
    pub flags: u32,
    /// Thread-group id (the process).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The faulting virtual address.
    pub address: u64,
    /// The instruction pointer at the fault (user or kernel).
    pub ip: u64,
    /// When the kernel accounted the fault (`CLOCK_MONOTONIC`, ns): orders it against the
    /// perf side-band records of mappings and exec.
    pub time_ns: u64,
    /// Fault entry to accounting, in nanoseconds.
    pub latency_ns: u64,
    /// Names a walked user stack: the CPU, the stack-cache slot and that CPU's walk count
    /// (see [`stack_token`]); 0 when the stack is not cached.
    pub stack_token: u64,
    /// x86 page-fault error code (`X86_PF_*` bits, all below bit 32) from the entry tracepoint.
    pub error_code: u32,
    /// User frames that follow this record (innermost first).
    pub n_user: u16,
    /// Kernel frames that follow the user frames (innermost first).
    pub n_kernel: u16,
    /// With `FAULT_SP_WORDS`: the words at the user stack pointer, `[rsp]` first.
    pub sp_words: [u64; SP_WORDS],
    /// With `FAULT_AT_ENTRY`: the thread's own fault counts as the fault began, from its
    /// `task_struct`: `maj_flt` in the high half, `min_flt` in the low half (each modulo
    /// 2^32). What they grew by at the thread's next fault says whether the kernel accounted
    /// this one, and as what.
    pub thread_faults: u64,
}

/// Fault records without frames a CPU gathers before it writes them to the ring buffer in
/// one call: a ring-buffer reserve and submit cost ~60 ns per record (a lock and two helper
/// calls), as much as the rest of the entry program.
pub const FAULT_BATCH: usize = 64;

/// `BatchedFault::flags`: a fault's completion, from the kernel's own accounting
/// (`PERF_COUNT_SW_PAGE_FAULTS_MAJ` on every major fault, `_MIN` on a sample of minor ones),
/// with `FAULT_MAJOR` or not and the time it was accounted: the fault's entry came before it
/// from the same thread, and the time between the two is the fault's latency.
pub const FAULT_COMPLETION: u32 = 1 << 7;

/// A fault's entry record without frames, as a batch holds it: [`FaultRecord`] less what
/// such a record never uses (the instruction pointer, latency, frame counts, stack-pointer
/// words), in 48 bytes instead of 96. Each byte is written twice (batch, then ring) and read
/// by the agent's CPU, so size is most of a record's cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchedFault {
    /// `FAULT_*` flags (`FAULT_AT_ENTRY` set), or `FAULT_COMPLETION` [| `FAULT_MAJOR`].
    pub flags: u32,
    pub pid: u32,
    pub tid: u32,
    pub error_code: u32,
    pub address: u64,
    pub time_ns: u64,
    pub stack_token: u64,
    pub thread_faults: u64,
}

/// A CPU's batch of fault records (`count` of `records` are valid), written to the ring
/// buffer whole when full, when its first record is [`FAULT_BATCH_MAX_AGE_NS`] old, and
/// before any other record of that CPU (so the ring keeps each CPU's order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FaultBatch {
    pub kind: u32,
    pub count: u32,
    /// When its first record was made.
    pub first_ns: u64,
    pub records: [BatchedFault; FAULT_BATCH],
}

/// A batch is written out at the next fault once its first record is this old.
pub const FAULT_BATCH_MAX_AGE_NS: u64 = 2_000_000;

/// Packs a thread's (`min_flt`, `maj_flt`) as [`FaultRecord::thread_faults`] carries them.
#[inline(always)]
pub const fn pack_thread_faults(min_flt: u64, maj_flt: u64) -> u64 {
    (maj_flt << 32) | (min_flt & 0xffff_ffff)
}

/// The (minor, major) faults a thread's counters grew by between two packed readings, or
/// `None` when they went down (the tid now names another thread).
#[inline(always)]
pub const fn thread_faults_since(before: u64, now: u64) -> Option<(u32, u32)> {
    let minor = (now as u32).wrapping_sub(before as u32);
    let major = ((now >> 32) as u32).wrapping_sub((before >> 32) as u32);
    // A real thread does not take 2^31 faults between two of its own records.
    if minor >= 1 << 31 || major >= 1 << 31 {
        return None;
    }
    Some((minor, major))
}

/// A fault record and room for its frames: the per-CPU buffer a walked fault is built in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FaultWithStacks {
    pub header: FaultRecord,
    /// User frames from index 0, kernel frames right after them.
    pub frames: [u64; 2 * MAX_STACK_DEPTH],
}

/// The token of a user stack walked on `cpu` into stack-cache `slot`, as its `walk`-th walk
/// on that CPU. Never 0. The agent keeps the last stack seen per (cpu, slot) and resolves
/// reused stacks by token: ring-buffer records of one CPU arrive in order, so the walk always
/// comes before the faults that reuse it.
#[inline(always)]
pub const fn stack_token(cpu: u32, slot: u32, walk: u64) -> u64 {
    ((cpu as u64 & 0x7fff) << 48) | ((slot as u64 & 0xff) << 40) | (walk & 0xff_ffff_ffff) | 1 << 63
}

/// The (cpu, slot) a stack token belongs to.
#[inline(always)]
pub const fn stack_token_slot(token: u64) -> (u32, u32) {
    (
        ((token >> 48) & 0x7fff) as u32,
        ((token >> 40) & 0xff) as u32,
    )
}

/// `VmaRecord::op` values.
pub const VMA_MMAP: u32 = 1;
pub const VMA_MUNMAP: u32 = 2;
pub const VMA_MREMAP: u32 = 3;
pub const VMA_BRK: u32 = 4;

/// A completed mmap/munmap/mremap/brk call (emitted at syscall exit, only on success).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmaRecord {
    pub kind: u32,
    pub op: u32,
    pub pid: u32,
    pub tid: u32,
    /// mmap: the address returned. munmap: the range start. mremap: old address. brk: new break.
    pub addr: u64,
    /// mmap/munmap: length. mremap: old length. brk: the break asked for.
    pub len: u64,
    /// mremap: new address (the return value). Otherwise 0.
    pub new_addr: u64,
    /// mremap: new length. Otherwise 0.
    pub new_len: u64,
    pub prot: u32,
    pub flags: u32,
    /// mmap: the file descriptor (-1 for anonymous).
    pub fd: i32,
    /// `VMA_STACK_WALKED`, `VMA_SP_WORDS`.
    pub stack_flags: u16,
    /// User frames that follow this record (innermost first), with `VMA_STACK_WALKED`.
    pub n_user: u16,
    /// mmap: file offset in bytes.
    pub offset: u64,
    /// When the syscall returned (`CLOCK_MONOTONIC`, ns).
    pub time_ns: u64,
    /// With `VMA_SP_WORDS`: the words at the user stack pointer, `[rsp]` first (the return
    /// address into the caller of the frameless libc wrapper).
    pub sp_words: [u64; SP_WORDS],
    /// Names the walk of a walked stack for later calls that reuse it (`VMA_STACK_REUSED`):
    /// see [`stack_token`]. 0 when not cached.
    pub stack_token: u64,
    /// With a walked stack: the user stack and frame pointers at the syscall, and how many
    /// bytes of the stack from `user_sp` up follow the record (before the frames), for the
    /// agent to unwind through code without frame pointers by its CFI.
    pub user_sp: u64,
    pub user_bp: u64,
    pub stack_copy: u32,
    pub _pad: u32,
}

/// Bytes of user stack a walked mapping call carries (and the smaller try, near the top of
/// a stack, where the larger read would run past its end).
pub const VMA_STACK_COPY: usize = 4096;
pub const VMA_STACK_COPY_SMALL: usize = 1024;

/// `VmaRecord::stack_flags`: the calling thread's user stack follows the record
/// (`memtrace vma`).
pub const VMA_STACK_WALKED: u16 = 1 << 0;
/// `VmaRecord::stack_flags`: `sp_words` is valid.
pub const VMA_SP_WORDS: u16 = 1 << 1;
/// `VmaRecord::stack_flags`: the stack was not walked; it is the one last walked under
/// `stack_token` (a call from the same instruction with the same frame and stack pointers).
pub const VMA_STACK_REUSED: u16 = 1 << 2;

/// Per-CPU stack-cache slots of the mapping syscalls (a loop of mallocs calls mmap from a
/// handful of places).
pub const VMA_STACK_SLOTS: u32 = 16;

/// A VMA record and room for a copy of the user stack and the user frames after it: the
/// per-CPU buffer it is built in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VmaWithStack {
    pub header: VmaRecord,
    pub data: [u8; VMA_STACK_COPY + 8 * MAX_STACK_DEPTH],
}

/// Where `struct pt_regs` may sit below the top of a task's kernel stack on x86_64
/// (`THREAD_SIZE` 16 or 32 KiB, `TOP_OF_KERNEL_STACK_PADDING` 0 or 16 with FRED): the
/// kernel program takes the candidate whose `orig_ax` is the syscall being traced.
pub const PT_REGS_CANDIDATES: [u32; 4] = [
    16384 - PT_REGS_SIZE,
    16384 - 16 - PT_REGS_SIZE,
    32768 - PT_REGS_SIZE,
    32768 - 16 - PT_REGS_SIZE,
];
/// `sizeof(struct pt_regs)` (x86_64 ABI), and the index of each register the mapping
/// programs read in it, as an array of u64.
pub const PT_REGS_SIZE: u32 = 168;
pub const PT_REGS_WORDS: usize = 21;
pub mod pt_regs {
    pub const BP: usize = 4;
    pub const R10: usize = 7;
    pub const R9: usize = 8;
    pub const R8: usize = 9;
    pub const DX: usize = 12;
    pub const SI: usize = 13;
    pub const DI: usize = 14;
    pub const ORIG_AX: usize = 15;
    pub const IP: usize = 16;
    pub const CS: usize = 17;
    pub const SP: usize = 19;
    /// Byte offset of `orig_ax`.
    pub const ORIG_AX_OFFSET: u64 = 120;
    /// `cs` of a 64-bit user task (`__USER_CS`); compat tasks number syscalls differently.
    pub const USER_CS_64: u64 = 0x33;
}

/// A stack new to `SLAB_STACKS` with user frames (`memtrace slab --user-stacks`): sent so the
/// agent symbolizes them while the process that allocated there still runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlabStackRecord {
    pub kind: u32,
    pub pid: u32,
    pub id: u64,
    pub time_ns: u64,
}

/// `ProcRecord::op` values.
pub const PROC_FORK: u32 = 1;
pub const PROC_EXEC: u32 = 2;
pub const PROC_EXIT: u32 = 3;

/// `kmem:rss_stat`'s `member` for anonymous pages (`MM_ANONPAGES`).
pub const MM_ANONPAGES: i32 = 1;

/// What one thread did to its process's anonymous RSS while traced (`kmem:rss_stat` with
/// `curr`: the change is the current task's own doing), keyed by tid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RssThread {
    pub pid: u32,
    pub _pad: u32,
    /// Sums of the rises and falls of the process's anonymous RSS at this thread's updates.
    pub grown: u64,
    pub shrunk: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// A process fork (new thread group), exec, or thread-group exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcRecord {
    pub kind: u32,
    pub op: u32,
    pub pid: u32,
    /// Fork: the child's pid. Otherwise equal to `pid`.
    pub child_pid: u32,
    pub comm: [u8; 16],
    /// When it happened (`CLOCK_MONOTONIC`, ns).
    pub time_ns: u64,
}

/// Syscall arguments stashed at entry until the syscall returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingSyscall {
    pub op: u32,
    pub _pad: u32,
    pub args: [u64; 6],
}

/// A fault whose entry was seen and whose accounting is awaited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultEntry {
    pub tid: u32,
    pub _pad: u32,
    pub address: u64,
    pub error_code: u64,
    pub entry_ns: u64,
}

/// A recently walked user stack. A fault loop repeats the same faulting instruction with the
/// same frame and stack pointers thousands of times; walking its stack again each time is the
/// dominant cost of stack capture, so a fault with the same registers reuses the last walk.
///
/// Registers cannot tell apart two call chains whose frames sit at the same stack addresses
/// (two functions with equal frame sizes calling the same helper from the same depth), and no
/// cheaper check than the walk itself sees every caller. So each walk serves a random number
/// of hits, uniform in 0..[`STACK_REWALK_MEAN`]*2, drawn when it is cached: a fault then
/// carries the stack of the last walk at its registers, taken at a random earlier fault, so
/// the stacks attributed to a group of faults are an unbiased sample of the group's real
/// stacks, whatever the pattern of callers (a fixed period would alias with a periodic
/// pattern: every 32nd of an A, A, A, B sequence is always the same caller; a random run
/// length shifts the pattern's phase uniformly). A uniform run length has a third less variance
/// than a coin toss per hit (a geometric run), and the hit path needs no random number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackCacheSlot {
    pub pid: u32,
    /// Hits this walk may still serve before the next fault at its registers walks again.
    pub hits_left: u32,
    /// The walk's token; 0 for an empty slot.
    pub token: u64,
    pub ip: u64,
    pub bp: u64,
    pub sp: u64,
}

/// A walk serves this many faults (itself and its hits) on average (a power of two).
pub const STACK_REWALK_MEAN: u32 = 128;

impl StackCacheSlot {
    /// The token of the cached walk for a fault with these registers, or `None` when the
    /// stack must be walked (another fault, an empty slot, or this walk's hits used up);
    /// then call [`Self::fill`].
    #[inline(always)]
    pub fn lookup(&mut self, pid: u32, ip: u64, bp: u64, sp: u64) -> Option<u64> {
        if self.pid != pid
            || self.ip != ip
            || self.bp != bp
            || self.sp != sp
            || self.token == 0
            || self.hits_left == 0
        {
            return None;
        }
        self.hits_left -= 1;
        Some(self.token)
    }

    /// Remembers a fresh walk (token 0: the walk failed, nothing to reuse); `random` draws
    /// how many hits it serves.
    #[inline(always)]
    pub fn fill(&mut self, pid: u32, ip: u64, bp: u64, sp: u64, token: u64, random: u32) {
        *self = StackCacheSlot {
            pid,
            hits_left: random & (2 * STACK_REWALK_MEAN - 1),
            token,
            ip,
            bp,
            sp,
        };
    }
}

/// Slots in each CPU's stack cache (a power of two). Several: an unrolled fault loop takes its
/// faults at 2-8 different instructions in turn, and a single slot would miss on every one.
pub const STACK_CACHE_SLOTS: u32 = 64;

/// The stack-cache slot for a fault at `ip` with frame pointer `bp` (Fibonacci hashing, so
/// nearby instructions of one loop spread over different slots).
#[inline(always)]
pub const fn stack_cache_slot(ip: u64, bp: u64) -> u32 {
    let h = (ip ^ bp.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - STACK_CACHE_SLOTS.trailing_zeros())) as u32
}

/// The last target-map answer on a CPU. A fault loop asks about the same process every time;
/// the answer stands while `TARGETS_GENERATION` (rewritten after every change to the target
/// map) is unchanged, which turns a hash lookup per fault into two array reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetCacheSlot {
    pub generation: u64,
    pub tgid: u32,
    pub is_target: u32,
}

/// Fault entries each CPU remembers. More than one: a fault can nest inside another's handling
/// (a tracer's stack walk touching a non-present user page takes a kernel-mode fault between
/// the outer fault's entry and its accounting), and the nested entry must not erase the outer.
pub const FAULT_ENTRY_SLOTS: usize = 4;

/// The per-CPU state the fault path reads and writes on every fault, in one map value (one
/// lookup, adjacent memory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    /// Faults this CPU is handling: written at entry (round robin), taken at accounting by
    /// thread and address.
    pub entries: [FaultEntry; FAULT_ENTRY_SLOTS],
    /// Entries written so far (the next slot is this modulo `FAULT_ENTRY_SLOTS`).
    pub entries_written: u64,
    pub target: TargetCacheSlot,
    /// Fault records submitted since this CPU last woke the agent.
    pub records_since_wakeup: u64,
    /// User stacks walked on this CPU (for stack tokens).
    pub walks: u64,
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Fault records dropped because the ring buffer was full.
    pub const RINGBUF_FULL_FAULT: u32 = 0;
    /// VMA and process records dropped because the ring buffer was full.
    pub const RINGBUF_FULL_OTHER: u32 = 1;
    /// User stacks not captured (the walk found no frame).
    pub const USER_STACK_LOST: u32 = 2;
    /// Kernel stacks not captured.
    pub const KERNEL_STACK_LOST: u32 = 3;
    /// Accounted faults whose entry was never seen (no latency for them).
    pub const ENTRY_MISSED: u32 = 4;
    /// Pending fault entries not spilled at a context switch (map full).
    pub const PENDING_FULL: u32 = 5;
    /// Child processes not followed because the target map was full.
    pub const TARGETS_FULL: u32 = 6;
    /// Syscall entries not stashed (map full).
    pub const SYSCALL_PENDING_FULL: u32 = 7;
    /// Slab allocations not tracked: the outstanding-object table was full.
    pub const SLAB_UNTRACKED: u32 = 8;
    /// Allocations at an address still tracked: the old object was freed without an event
    /// (kfree_rcu on sheaf caches, bulk frees); it counts as freed.
    pub const SLAB_IMPLICIT_FREES: u32 = 9;
    /// Site counts not kept when a site slot was handed over (the counter map was full).
    pub const SLAB_SITES_FULL: u32 = 10;
    /// Stack walks that found no frame, or nested too deep to have room.
    pub const SLAB_STACK_LOST: u32 = 11;
    /// Stacks captured but not kept (the stack map was full).
    pub const SLAB_STACKS_FULL: u32 = 12;
    /// kmem_cache names not recorded (the cache map was full, or the name could not be read).
    pub const SLAB_CACHE_UNNAMED: u32 = 13;
    /// Frees the second free program saw unhandled by the first (which was skipped: the free
    /// came while it ran on that CPU).
    pub const SLAB_FREES_NESTED: u32 = 14;
    /// A mapping syscall whose saved user registers were not found: the call is missed.
    pub const SYSCALL_ARGS_UNREAD: u32 = 15;
    pub const COUNT: u32 = 16;
}

/// Configuration written into the kernel programs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Non-zero: only processes in the `TARGETS` map (and the children they fork) are traced.
    pub filter_pids: u32,
    /// Non-zero: capture user (and, for kernel-mode faults, kernel) stacks.
    pub capture_stacks: u32,
    /// Non-zero: reuse the last walk when a fault repeats ip, frame and stack pointers.
    pub stack_cache: u32,
    /// A process never traced (memtrace itself, so a system-wide run does not count its own
    /// faults); 0 for none.
    pub exclude_tgid: u32,
    /// Non-zero: capture the kernel stack of slab allocations (`memtrace slab --stacks`).
    pub slab_kernel_stacks: u32,
    /// Non-zero: capture the user stack of the allocating task (`--user-stacks`).
    pub slab_user_stacks: u32,
    /// Byte offsets in `struct kmem_cache` (from the kernel's BTF) of `name`, `object_size` and
    /// `size`, read once per cache the first time one of its objects is allocated;
    /// [`OFFSET_UNKNOWN`] when this kernel's BTF does not say.
    pub kmem_cache_name_off: u32,
    pub kmem_cache_object_size_off: u32,
    pub kmem_cache_size_off: u32,
    /// Buckets in the outstanding-object table, less one (a power of two, less one).
    pub slab_bucket_mask: u32,
    /// Non-zero: mmap, mremap and brk records carry the caller's user stack (`memtrace vma`).
    pub vma_stacks: u32,
    /// Byte offset of `stack` in `struct task_struct` (from BTF), to find the user registers
    /// of a syscall; [`OFFSET_UNKNOWN`] when unknown.
    pub task_stack_off: u32,
    /// Byte offsets in `struct task_struct` (from BTF) read at each fault's entry by the
    /// BTF-typed entry programs: `pid`, `tgid`, `min_flt`, `maj_flt`, `pagefault_disabled`.
    /// The agent loads those programs only when all five are known.
    pub task_pid_off: u32,
    pub task_tgid_off: u32,
    pub task_min_flt_off: u32,
    pub task_maj_flt_off: u32,
    pub task_pagefault_disabled_off: u32,
}

/// A `Config` offset the agent could not find.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

impl Config {
    pub const DEFAULT: Config = Config {
        filter_pids: 0,
        capture_stacks: 1,
        stack_cache: 1,
        exclude_tgid: 0,
        slab_kernel_stacks: 0,
        slab_user_stacks: 0,
        kmem_cache_name_off: OFFSET_UNKNOWN,
        kmem_cache_object_size_off: OFFSET_UNKNOWN,
        kmem_cache_size_off: OFFSET_UNKNOWN,
        slab_bucket_mask: 0,
        vma_stacks: 0,
        task_stack_off: OFFSET_UNKNOWN,
        task_pid_off: OFFSET_UNKNOWN,
        task_tgid_off: OFFSET_UNKNOWN,
        task_min_flt_off: OFFSET_UNKNOWN,
        task_maj_flt_off: OFFSET_UNKNOWN,
        task_pagefault_disabled_off: OFFSET_UNKNOWN,
    };
}

/// Addresses per bucket of the outstanding-object table: with the overflow word, one cache
/// line.
pub const SLAB_BUCKET_WAYS: usize = 7;

/// A bucket of the outstanding-object table: the addresses of outstanding objects (0: a free
/// way), one cache line. The record of the object at way `w` is `allocs[w]` of the bucket's
/// [`SlabRecords`], in a second array: the keys alone (16 MiB for a million objects) stay in
/// the CPU's cache, where keys and records together (150 MiB) did not, and a free then touches
/// one cached line (redis on loopback, whose skbs come and go on both CPUs: 245 ns per
/// allocation with records beside the keys).
///
/// The table is a set-associative array rather than a BPF hash map: a hash map insert and
/// delete each take a bucket spinlock with interrupts off and a free-list lock, about 90 ns
/// per object on this machine kind, where scanning one cache line of keys takes a few. Each
/// address has two candidate buckets (its hash's and the next), so a table of twice the
/// objects tracked rarely refuses one. The agent reads it a few hundred buckets at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabBucket {
    pub keys: [u64; SLAB_BUCKET_WAYS],
    /// Non-zero once an address of this bucket went to the next one (this one was full):
    /// until then a lookup reads this one line only.
    pub overflowed: u64,
}

/// The records of one bucket's objects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabRecords {
    pub allocs: [SlabAlloc; SLAB_BUCKET_WAYS],
}

/// The bucket an address hashes to (`mask`: buckets less one).
#[inline(always)]
pub const fn slab_bucket(ptr: u64, mask: u32) -> u32 {
    ((ptr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 & mask
}

/// Buckets for a table tracking `max_tracked` objects: a power of two, with 1.5 to 3 ways an
/// object (a million objects: 2^18 buckets, 1.75 ways each).
pub const fn slab_buckets_for(max_tracked: u32) -> u32 {
    let needed = (max_tracked as u64 * 3).div_ceil(2 * SLAB_BUCKET_WAYS as u64);
    let buckets = needed.next_power_of_two();
    if buckets > 1 << 28 {
        1 << 28
    } else if buckets < 2 {
        2
    } else {
        buckets as u32
    }
}

/// `gfp_t` bits that pick the kmalloc cache family (`__GFP_DMA`, `__GFP_RECLAIMABLE`,
/// `__GFP_ACCOUNT`; include/linux/gfp_types.h).
pub const GFP_DMA: u64 = 1 << 0;
pub const GFP_RECLAIMABLE: u64 = 1 << 4;
pub const GFP_ACCOUNT: u64 = 1 << 22;
pub const GFP_KMALLOC_FAMILY: u64 = GFP_DMA | GFP_RECLAIMABLE | GFP_ACCOUNT;

/// `SlabAlloc::cache` of a kmalloc object: no `struct kmem_cache` is named by the event, so the
/// size class stands for it: the bytes allocated, with the gfp bits that choose the cache family
/// in the upper half. Kernel pointers have their top bits set; these never do.
#[inline(always)]
pub const fn kmalloc_cache_id(bytes_alloc: u64, gfp: u64) -> u64 {
    ((gfp & GFP_KMALLOC_FAMILY) << 32) | (bytes_alloc & 0xffff_ffff)
}

/// `SlabAlloc::cache` of memory that comes from no slab cache (`memtrace slab --pages,
/// --percpu, --vmalloc`): the last page of the address space, where no `struct kmem_cache`
/// lives. Pages carry their order in the low bits.
pub const PAGES_CACHE_ID: u64 = 0xffff_ffff_ffff_f100;
pub const PERCPU_CACHE_ID: u64 = 0xffff_ffff_ffff_f200;
pub const VMALLOC_CACHE_ID: u64 = 0xffff_ffff_ffff_f300;

/// Is this `SlabAlloc::cache` one of the non-slab kinds (pages, percpu, vmalloc)?
#[inline(always)]
pub const fn is_other_memory_id(cache: u64) -> bool {
    cache >= PAGES_CACHE_ID
}

/// Is this `SlabAlloc::cache` a kmalloc size class (not a `struct kmem_cache` pointer)?
#[inline(always)]
pub const fn is_kmalloc_cache_id(cache: u64) -> bool {
    cache >> 63 == 0
}

/// `SlabAlloc::flags`: the allocation is charged to a memory cgroup (`__GFP_ACCOUNT`).
pub const SLAB_ACCOUNTED: u32 = 1 << 0;
/// `SlabAlloc::flags`: the record carries the bytes (kmalloc, pages, percpu, vmalloc); else
/// the cache's sizes hold (kmem_cache_alloc).
pub const SLAB_KMALLOC: u32 = 1 << 1;

/// An outstanding slab object's record, in the outstanding-object table (see [`SlabBucket`])
/// until it is freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabAlloc {
    /// When it was allocated (`CLOCK_MONOTONIC`, ns).
    pub time_ns: u64,
    /// The kernel address that asked for it.
    pub call_site: u64,
    /// The `struct kmem_cache` pointer, or a [`kmalloc_cache_id`].
    pub cache: u64,
    /// The allocating task's cgroup (v2) id.
    pub cgroup: u64,
    /// The allocation's kernel stack in `SLAB_STACKS` ([`stack_hash`]); 0 without one.
    pub stack_id: u64,
    pub pid: u32,
    pub tid: u32,
    /// kmalloc: bytes asked for and handed out. kmem_cache_alloc: 0 (the cache's sizes hold).
    pub bytes_req: u32,
    pub bytes_alloc: u32,
    /// `SLAB_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// A kmem_cache, recorded the first time one of its objects is allocated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlabCacheInfo {
    /// NUL-terminated (or full) name.
    pub name: [u8; SLAB_CACHE_NAME_LEN],
    pub object_size: u32,
    pub size: u32,
}

pub const SLAB_CACHE_NAME_LEN: usize = 56;

/// Per-CPU allocation counts are kept per (call site, cache).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlabSiteKey {
    pub call_site: u64,
    pub cache: u64,
}

/// What a CPU counted for one (call site, cache).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabSiteCounts {
    pub allocs: u64,
    /// Objects of this site found freed without an event (their address was allocated again
    /// while still tracked). A site where these are common frees out of the tracer's sight.
    pub implicit_frees: u64,
    /// Allocations not tracked because the site frees out of sight (`SlabSiteSlot::untracked`).
    pub skipped: u64,
}

impl core::ops::AddAssign<&SlabSiteCounts> for SlabSiteCounts {
    #[inline(always)]
    fn add_assign(&mut self, other: &SlabSiteCounts) {
        self.allocs += other.allocs;
        self.implicit_frees += other.implicit_frees;
        self.skipped += other.skipped;
    }
}

/// A CPU's running counts for one (call site, cache), direct-mapped by [`slab_site_slot`]:
/// an array slot updated in place on each allocation, added into `SLAB_SITES` only when another
/// site takes the slot. With `--stacks`, the slot also remembers the last stack walked there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabSiteSlot {
    pub key: SlabSiteKey,
    /// Counted since the slot was taken, not yet in `SLAB_SITES`.
    pub counts: SlabSiteCounts,
    /// The last kernel stack walked for this site on this CPU (0: none).
    pub stack_id: u64,
    /// Allocations that may still reuse `stack_id` before the next walk.
    pub stack_hits_left: u32,
    /// Non-zero: the agent found this site (or its cache) freeing out of sight; its objects
    /// are counted but not tracked, or they would fill the table with objects long freed.
    pub untracked: u32,
    /// The `SLAB_UNTRACKED_GENERATION` `untracked` was looked up at.
    pub generation: u64,
}

/// Site slots per CPU (a power of two).
pub const SLAB_SITE_SLOT_COUNT: u32 = 512;

/// The slot of a (call site, cache) in a CPU's site slots.
#[inline(always)]
pub const fn slab_site_slot(call_site: u64, cache: u64) -> u32 {
    let h = (call_site ^ cache.rotate_left(23)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - SLAB_SITE_SLOT_COUNT.trailing_zeros())) as u32
}

/// A kernel stack walked at an allocation serves the next allocations at the same call site
/// on that CPU, a random number of them, uniform in 0..2 * this: walking every allocation's
/// stack costs several times the allocation itself, and the allocations of a site are then
/// attributed to an unbiased sample of its stacks (see [`StackCacheSlot`] for the argument).
pub const SLAB_STACK_REWALK_MEAN: u32 = 32;

/// Kernel frames kept per slab allocation stack.
pub const SLAB_STACK_DEPTH: usize = 48;
/// User frames kept per slab allocation stack (`--user-stacks`).
pub const SLAB_USER_STACK_DEPTH: usize = 32;

/// The stacks captured at an allocation, in `SLAB_STACKS` under their [`stack_hash`]: the
/// kernel's (innermost first, 0 past the last) and the allocating task's user stack.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlabStack {
    pub frames: [u64; SLAB_STACK_DEPTH],
    pub user: [u64; SLAB_USER_STACK_DEPTH],
}

/// The id of a stack: a 64-bit hash of its frames (never 0). Ids are content hashes rather than
/// slots of a stack map, so they never go stale: a full map loses new stacks (counted), and
/// never hands an old id a different stack. Frames past the captured ones must be 0.
#[inline(always)]
pub fn stack_hash(stack: &SlabStack) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < SLAB_STACK_DEPTH {
        h = (h ^ stack.frames[i]).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
        i += 1;
    }
    let mut i = 0;
    while i < SLAB_USER_STACK_DEPTH {
        h = (h ^ stack.user[i]).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
        i += 1;
    }
    h | 1
}

/// Tracepoint record layouts the kernel programs read (field name, byte offset, size).
///
/// The verifier only allows constant offsets into a tracepoint record, so these are compiled
/// in; the agent checks each one against `/sys/kernel/tracing/events/<tp>/format` before it
/// loads anything, and refuses with the differing field named instead of reading garbage.
pub mod layout {
    pub type Field = (&'static str, usize, usize);
    pub const PF_ADDRESS: Field = ("address", 8, 8);
    pub const PF_IP: Field = ("ip", 16, 8);
    pub const PF_ERROR_CODE: Field = ("error_code", 24, 8);
    pub const NEWTASK_PID: Field = ("pid", 8, 4);
    pub const NEWTASK_CLONE_FLAGS: Field = ("clone_flags", 32, 8);
    pub const EXIT_GROUP_DEAD: Field = ("group_dead", 32, 1);
    /// `sys_enter_*`: the n-th argument is at `SYSCALL_ARG0 + 8 * n`; `sys_exit_*`: `ret`.
    pub const SYSCALL_ARG0: usize = 16;
    pub const SYSCALL_RET: Field = ("ret", 16, 8);
    /// kmem:kmalloc, kmem:kmem_cache_alloc, kmem:kfree, kmem:kmem_cache_free (classic
    /// tracepoints, used where raw ones are refused).
    pub const KMEM_CALL_SITE: Field = ("call_site", 8, 8);
    pub const KMEM_PTR: Field = ("ptr", 16, 8);
    pub const KMALLOC_BYTES_REQ: Field = ("bytes_req", 24, 8);
    pub const KMALLOC_BYTES_ALLOC: Field = ("bytes_alloc", 32, 8);
    pub const KMALLOC_GFP: Field = ("gfp_flags", 40, 8);
    pub const CACHE_ALLOC_NAME: Field = ("name", 24, 4);
    pub const CACHE_ALLOC_BYTES_REQ: Field = ("bytes_req", 32, 8);
    pub const CACHE_ALLOC_BYTES_ALLOC: Field = ("bytes_alloc", 40, 8);
    pub const CACHE_ALLOC_GFP: Field = ("gfp_flags", 48, 8);
    /// kmem:rss_stat.
    pub const RSS_CURR: Field = ("curr", 12, 4);
    pub const RSS_MEMBER: Field = ("member", 16, 4);
    pub const RSS_SIZE: Field = ("size", 24, 8);

    /// Every (tracepoint, field) the kernel programs read, for the agent's check.
    pub const CHECKED: &[(&str, &str, Field)] = &[
        ("exceptions", "page_fault_user", PF_ADDRESS),
        ("exceptions", "page_fault_user", PF_IP),
        ("exceptions", "page_fault_user", PF_ERROR_CODE),
        ("exceptions", "page_fault_kernel", PF_ADDRESS),
        ("exceptions", "page_fault_kernel", PF_ERROR_CODE),
        ("task", "task_newtask", NEWTASK_PID),
        ("task", "task_newtask", NEWTASK_CLONE_FLAGS),
        ("sched", "sched_process_exit", EXIT_GROUP_DEAD),
        ("syscalls", "sys_enter_mmap", ("addr", 16, 8)),
        ("syscalls", "sys_enter_mmap", ("off", 56, 8)),
        ("syscalls", "sys_enter_munmap", ("len", 24, 8)),
        ("syscalls", "sys_enter_mremap", ("new_addr", 48, 8)),
        ("syscalls", "sys_enter_brk", ("brk", 16, 8)),
        ("syscalls", "sys_exit_mmap", SYSCALL_RET),
        ("syscalls", "sys_exit_munmap", SYSCALL_RET),
        ("syscalls", "sys_exit_mremap", SYSCALL_RET),
        ("syscalls", "sys_exit_brk", SYSCALL_RET),
        ("kmem", "kmalloc", KMEM_CALL_SITE),
        ("kmem", "kmalloc", KMEM_PTR),
        ("kmem", "kmalloc", KMALLOC_BYTES_REQ),
        ("kmem", "kmalloc", KMALLOC_BYTES_ALLOC),
        ("kmem", "kmalloc", KMALLOC_GFP),
        ("kmem", "kmem_cache_alloc", KMEM_CALL_SITE),
        ("kmem", "kmem_cache_alloc", KMEM_PTR),
        ("kmem", "kmem_cache_alloc", CACHE_ALLOC_NAME),
        ("kmem", "kmem_cache_alloc", CACHE_ALLOC_BYTES_REQ),
        ("kmem", "kmem_cache_alloc", CACHE_ALLOC_BYTES_ALLOC),
        ("kmem", "kmem_cache_alloc", CACHE_ALLOC_GFP),
        ("kmem", "kfree", KMEM_PTR),
        ("kmem", "kmem_cache_free", KMEM_PTR),
        ("kmem", "rss_stat", RSS_CURR),
        ("kmem", "rss_stat", RSS_MEMBER),
        ("kmem", "rss_stat", RSS_SIZE),
    ];
}

/// Maximum number of frames in a stack trace (the kernel's `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have no
    // implicit padding (checked by the layout tests below), so every bit pattern is valid.
    unsafe impl aya::Pod for FaultRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FaultBatch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BatchedFault {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VmaRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProcRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PendingSyscall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FaultEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabAlloc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabCacheInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabSiteKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabStack {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabSiteCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabSiteSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabRecords {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlabStackRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RssThread {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn thread_fault_deltas() {
        let before = pack_thread_faults(10, 2);
        assert_eq!(thread_faults_since(before, before), Some((0, 0)));
        assert_eq!(
            thread_faults_since(before, pack_thread_faults(11, 2)),
            Some((1, 0))
        );
        assert_eq!(
            thread_faults_since(before, pack_thread_faults(10, 3)),
            Some((0, 1))
        );
        // Across the 32-bit wrap of a counter.
        let wrapping = pack_thread_faults(u32::MAX as u64, 0);
        assert_eq!(
            thread_faults_since(wrapping, pack_thread_faults(1 << 32 | 2, 0)),
            Some((3, 0))
        );
        // A reused tid: the counters start again from 0.
        assert_eq!(thread_faults_since(before, pack_thread_faults(3, 0)), None);
    }

    #[test]
    fn records_have_no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hidden padding bytes anywhere.
        assert_eq!(
            size_of::<FaultRecord>(),
            4 * 4 + 8 * 5 + 4 + 2 * 2 + 8 * SP_WORDS + 8
        );
        assert_eq!(
            size_of::<FaultBatch>(),
            16 + FAULT_BATCH * size_of::<BatchedFault>()
        );
        assert_eq!(size_of::<BatchedFault>(), 4 * 4 + 8 * 4);
        assert_eq!(
            size_of::<FaultWithStacks>(),
            size_of::<FaultRecord>() + 8 * 2 * MAX_STACK_DEPTH
        );
        // kind..tid, addr..new_len, prot/flags/fd + stack_flags/n_user, offset/time_ns,
        // sp_words, stack_token.
        assert_eq!(
            size_of::<VmaRecord>(),
            4 * 4 + 8 * 4 + 4 * 3 + 2 * 2 + 8 * 2 + 8 * SP_WORDS + 8 + 8 * 2 + 4 * 2
        );
        assert_eq!(
            size_of::<VmaWithStack>(),
            size_of::<VmaRecord>() + VMA_STACK_COPY + 8 * MAX_STACK_DEPTH
        );
        assert_eq!(size_of::<ProcRecord>(), 4 * 4 + 16 + 8);
        assert_eq!(size_of::<RssThread>(), 4 * 2 + 8 * 4);
        assert_eq!(size_of::<SlabStackRecord>(), 4 * 2 + 8 * 2);
        assert_eq!(size_of::<Config>(), 4 * 17);
        assert_eq!(size_of::<SlabBucket>(), 64);
        assert_eq!(
            size_of::<SlabRecords>(),
            size_of::<SlabAlloc>() * SLAB_BUCKET_WAYS
        );
        assert_eq!(size_of::<SlabAlloc>(), 8 * 5 + 4 * 6);
        assert_eq!(size_of::<SlabCacheInfo>(), SLAB_CACHE_NAME_LEN + 4 * 2);
        assert_eq!(size_of::<SlabSiteKey>(), 8 * 2);
        assert_eq!(size_of::<SlabSiteCounts>(), 8 * 3);
        assert_eq!(size_of::<SlabSiteSlot>(), 8 * 7 + 4 * 2);
        assert_eq!(
            size_of::<SlabStack>(),
            8 * (SLAB_STACK_DEPTH + SLAB_USER_STACK_DEPTH)
        );
        assert_eq!(size_of::<TargetCacheSlot>(), 8 + 4 * 2);
        assert_eq!(
            size_of::<CpuState>(),
            FAULT_ENTRY_SLOTS * size_of::<FaultEntry>() + 8 + size_of::<TargetCacheSlot>() + 16
        );
        assert_eq!(size_of::<PendingSyscall>(), 8 + 8 * 6);
        assert_eq!(size_of::<FaultEntry>(), 8 + 8 * 3);
        assert_eq!(size_of::<StackCacheSlot>(), 8 + 8 * 4);
    }

    #[test]
    fn stack_cache_spreads_an_unrolled_loop() {
        // The four stores of a 4x-unrolled page-touch loop (from memtrace-workload's release
        // build) must land in four different slots, or they evict each other on every fault.
        let bp = 0x7ffd_1234_5670;
        let ips = [0x1d603u64, 0x1d60d, 0x1d618, 0x1d627].map(|o| 0x5555_5555_0000 + o);
        let mut slots = ips.map(|ip| stack_cache_slot(ip, bp));
        assert!(slots.iter().all(|&s| s < STACK_CACHE_SLOTS));
        slots.sort_unstable();
        assert!(slots.windows(2).all(|w| w[0] != w[1]), "{slots:?}");
    }

    #[test]
    fn stack_cache_walks_again_at_random() {
        let (pid, ip, bp, sp) = (7, 0x1000, 0x7ff0, 0x7fe0);
        let mut slot = StackCacheSlot::default();
        assert_eq!(slot.lookup(pid, ip, bp, sp), None, "empty slot");
        // Each walk serves as many hits as its random draw says, 0..2*mean.
        let mut served = 0;
        for random in 0..2 * STACK_REWALK_MEAN {
            slot.fill(pid, ip, bp, sp, 42, random + 0x1234_5600);
            let hits = core::iter::from_fn(|| slot.lookup(pid, ip, bp, sp)).count();
            assert_eq!(hits as u32, random, "hits of draw {random}");
            served += hits as u32 + 1;
        }
        assert_eq!(served / (2 * STACK_REWALK_MEAN), STACK_REWALK_MEAN);
        // Any register differing, another process, or a failed walk: walk.
        slot.fill(pid, ip, bp, sp, 42, 5);
        assert_eq!(slot.lookup(pid, ip, bp, sp + 8), None);
        assert_eq!(slot.lookup(pid, ip, bp + 8, sp), None);
        assert_eq!(slot.lookup(pid, ip + 1, bp, sp), None);
        assert_eq!(slot.lookup(pid + 1, ip, bp, sp), None);
        assert_eq!(slot.lookup(pid, ip, bp, sp), Some(42));
        slot.fill(pid, ip, bp, sp, 0, 5);
        assert_eq!(slot.lookup(pid, ip, bp, sp), None);
    }

    #[test]
    fn stack_tokens_name_their_slot_and_are_never_zero() {
        for (cpu, slot, walk) in [(0, 0, 0), (1, 63, 5), (511, 17, u64::MAX)] {
            let t = stack_token(cpu, slot, walk);
            assert_ne!(t, 0);
            assert_eq!(stack_token_slot(t), (cpu, slot));
        }
        assert_ne!(stack_token(1, 2, 3), stack_token(1, 2, 4));
    }

    #[test]
    fn other_memory_ids_are_apart_from_caches() {
        for id in [PAGES_CACHE_ID | 3, PERCPU_CACHE_ID, VMALLOC_CACHE_ID] {
            assert!(is_other_memory_id(id) && !is_kmalloc_cache_id(id));
        }
        assert!(!is_other_memory_id(0xffff_8880_0123_4500));
        assert!(!is_other_memory_id(kmalloc_cache_id(8192, GFP_ACCOUNT)));
    }

    #[test]
    fn kmalloc_ids_never_look_like_kernel_pointers() {
        let id = kmalloc_cache_id(192, GFP_ACCOUNT | (1 << 6) | (1 << 7));
        assert!(is_kmalloc_cache_id(id));
        assert_eq!(id, (GFP_ACCOUNT << 32) | 192);
        assert!(!is_kmalloc_cache_id(0xffff_8880_0123_4500));
        // Bits other than the family are dropped: GFP_KERNEL and GFP_NOWAIT share a cache.
        assert_eq!(kmalloc_cache_id(64, 0xcc0), kmalloc_cache_id(64, 0x2800));
    }

    #[test]
    fn the_outstanding_table_has_room_for_twice_the_objects() {
        for n in [1000u32, 1 << 20, 3_000_000] {
            let ways = slab_buckets_for(n) as u64 * SLAB_BUCKET_WAYS as u64;
            assert!(ways * 2 >= n as u64 * 3, "{n}: {ways} ways");
            assert!(ways <= n as u64 * 3, "{n}: {ways} ways");
        }
        assert_eq!(slab_buckets_for(1 << 20), 1 << 18);
        assert_eq!(slab_buckets_for(1), 2);
        // Nearby objects of one slab spread over buckets.
        let mask = slab_buckets_for(1 << 20) - 1;
        let base = 0xffff_8880_1234_0000u64;
        let mut buckets: [u32; 16] =
            core::array::from_fn(|i| slab_bucket(base + 64 * i as u64, mask));
        buckets.sort_unstable();
        assert!(buckets.windows(2).all(|w| w[0] != w[1]), "{buckets:?}");
    }

    #[test]
    fn stack_hashes_tell_kernel_and_user_frames_apart() {
        let mut a = SlabStack {
            frames: [0; SLAB_STACK_DEPTH],
            user: [0; SLAB_USER_STACK_DEPTH],
        };
        assert_ne!(stack_hash(&a), 0);
        a.frames[..3].copy_from_slice(&[1, 2, 3]);
        let mut b = a;
        assert_eq!(stack_hash(&a), stack_hash(&b));
        b.user[0] = 0x7f00_0000_1000;
        assert_ne!(stack_hash(&a), stack_hash(&b));
        let mut c = a;
        c.frames[2] = 0;
        assert_ne!(stack_hash(&a), stack_hash(&c));
    }

    #[test]
    fn record_kind_round_trips() {
        for k in [
            RecordKind::Fault,
            RecordKind::Vma,
            RecordKind::Proc,
            RecordKind::SlabStack,
            RecordKind::FaultBatch,
        ] {
            assert_eq!(RecordKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(RecordKind::from_u32(0), None);
    }
}
