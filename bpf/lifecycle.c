// Process lifecycle: fork/thread/exec/exit counters aggregated in the kernel, plus exec and
// exit records streamed to user space. Tracepoint fields and helpers only: no kernel struct is
// ever dereferenced (header offsets are wrong on kernels newer than their headers).
//
// Why task:task_newtask and not sched:sched_process_fork: both fire once per successful clone
// (processes, threads and kernel threads alike, right after the kernel bumps the counter behind
// /proc/stat "processes"), but only task_newtask carries clone_flags, the one field that tells
// a thread (CLONE_THREAD) from a process. Attaching both would double the per-clone cost.
//
// Compile-time settings (-D): PARENT_ENTRIES, CGROUP_ENTRIES, TASK_ENTRIES, STATUS_ENTRIES,
// RINGBUF_PAGES, USE_PERFBUF (perf buffer instead of ring buffer), DEFAULT_SHORT_NS.

#define CLONE_THREAD_FLAG 0x00010000ULL

#ifndef PARENT_ENTRIES
#define PARENT_ENTRIES 16384
#endif
#ifndef CGROUP_ENTRIES
#define CGROUP_ENTRIES 4096
#endif
#ifndef TASK_ENTRIES
#define TASK_ENTRIES 65536
#endif
#ifndef STATUS_ENTRIES
#define STATUS_ENTRIES 4096
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef DEFAULT_SHORT_NS
#define DEFAULT_SHORT_NS 1000000000ULL
#endif

// Counter slots, in LifecycleCounts order.
#define C_FORKS 0
#define C_THREADS 1
#define C_EXECS 2
#define C_EXITS 3
#define C_SHORT 4
#define NCOUNTS 5

// Health slots (per-CPU, monotonic).
#define H_DROP_EXEC 0     // exec record not handed over: buffer full
#define H_DROP_EXIT 1     // exit record not handed over: buffer full
#define H_OVERFLOW 2      // aggregation or task map refused an insert
#define H_UNTRACKED 3     // process exit whose creation was not seen
#define NHEALTH 4

#define REC_EXEC 1
#define REC_EXIT 2

#define F_LIFETIME 1      // lifetime_ns is known (creation was seen)
#define F_CODE 2          // exit_code came from exit_group()
#define F_SIGNAL 4        // sig is the fatal signal that ended it

struct counts {
    u64 v[NCOUNTS];
};

// One live process, keyed by its pid (== tgid); threads are not stored.
struct task_info {
    u64 start_ns;
    u32 creator;          // tgid that called clone()
    u32 execd;
};

// How a thread group is ending, keyed by tgid; filled before its leader exits.
struct exit_status {
    s32 code;
    u32 sig;
    u32 flags;            // F_CODE, F_SIGNAL
    u32 pad;
};

// Layout shared with linnixd/collector/lifecycle.py (_Record).
struct record {
    u64 ts;               // bpf_ktime_get_ns: CLOCK_MONOTONIC
    u64 cgroup_id;
    u64 lifetime_ns;
    u32 kind;             // REC_EXEC or REC_EXIT
    u32 pid;
    u32 ppid;             // creator tgid, 0 when the creation was not seen
    s32 exit_code;
    u32 sig;
    u32 flags;
    char comm[16];
};

BPF_PERCPU_ARRAY(totals, struct counts, 1);
BPF_PERCPU_ARRAY(health, u64, NHEALTH);
BPF_HASH(by_parent, u32, struct counts, PARENT_ENTRIES);
BPF_HASH(by_cgroup, u64, struct counts, CGROUP_ENTRIES);
BPF_TABLE("lru_hash", u32, struct task_info, tasks, TASK_ENTRIES);
BPF_TABLE("lru_hash", u32, struct exit_status, statuses, STATUS_ENTRIES);
BPF_ARRAY(config, u64, 1);  // [0]: short-lived threshold in ns, 0 = DEFAULT_SHORT_NS

#ifdef USE_PERFBUF
BPF_PERF_OUTPUT(records);
#else
BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
#endif

static __always_inline void bump_health(u32 slot)
{
    u64 *h = health.lookup(&slot);
    if (h)
        (*h)++;
}

// Count one event for the host, for the creator (when known) and for the cgroup.
// `short_exit` adds a short-lived exit to the same entries (exits only).
static __always_inline void account(u32 creator, u64 cgid, int slot, int short_exit)
{
    u32 zero = 0;
    struct counts empty = {};
    struct counts *t = totals.lookup(&zero);
    if (t) {
        t->v[slot]++;  // per-CPU: no atomics needed
        if (short_exit)
            t->v[C_SHORT]++;
    }
    if (creator) {
        struct counts *p = by_parent.lookup_or_try_init(&creator, &empty);
        if (p) {
            __sync_fetch_and_add(&p->v[slot], 1);
            if (short_exit)
                __sync_fetch_and_add(&p->v[C_SHORT], 1);
        } else {
            bump_health(H_OVERFLOW);
        }
    }
    struct counts *c = by_cgroup.lookup_or_try_init(&cgid, &empty);
    if (c) {
        __sync_fetch_and_add(&c->v[slot], 1);
        if (short_exit)
            __sync_fetch_and_add(&c->v[C_SHORT], 1);
    } else {
        bump_health(H_OVERFLOW);
    }
}

static __always_inline void emit(void *ctx, struct record *r, u32 drop_slot)
{
#ifdef USE_PERFBUF
    int err = records.perf_submit(ctx, r, sizeof(*r));
#else
    int err = records.ringbuf_output(r, sizeof(*r), 0);
#endif
    if (err < 0)
        bump_health(drop_slot);
}

// Runs in the creator's context: current tgid/cgroup are the creator's; args->pid is the child.
TRACEPOINT_PROBE(task, task_newtask)
{
    u32 creator = bpf_get_current_pid_tgid() >> 32;
    u64 cgid = bpf_get_current_cgroup_id();  // the child starts here too (but CLONE_INTO_CGROUP)
    if (args->clone_flags & CLONE_THREAD_FLAG) {
        account(creator, cgid, C_THREADS, 0);
        return 0;
    }
    u32 child = args->pid;
    struct task_info info = {.start_ns = bpf_ktime_get_ns(), .creator = creator};
    if (tasks.update(&child, &info) < 0)
        bump_health(H_OVERFLOW);
    account(creator, cgid, C_FORKS, 0);
    return 0;
}

// Runs in the exec'ing task after the new image is in place: comm is the new one, and
// args->pid is the thread group's pid even when a non-leader thread called execve().
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = args->pid;
    u64 cgid = bpf_get_current_cgroup_id();
    u32 creator = 0;
    struct task_info *info = tasks.lookup(&pid);
    if (info) {
        info->execd = 1;
        creator = info->creator;
    }
    account(creator, cgid, C_EXECS, 0);
    struct record r = {};
    r.kind = REC_EXEC;
    r.ts = bpf_ktime_get_ns();
    r.cgroup_id = cgid;
    r.pid = pid;
    r.ppid = creator;
    bpf_get_current_comm(&r.comm, sizeof(r.comm));
    emit(args, &r, H_DROP_EXEC);
    return 0;
}

// exit_group(): the process's exit status, kept until its leader's exit record is built.
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exit_status st = {.code = args->error_code & 0xff, .flags = F_CODE};
    statuses.update(&tgid, &st);
    return 0;
}

// Signals whose default action terminates the process (stop/continue/ignore ones excluded:
// SIGCHLD..SIGURG = 17..23 and SIGWINCH = 28). Real-time signals (32..64) terminate too.
#define NONFATAL_DEFAULT_MASK 0x10FE0000ULL

// A default-action fatal signal being delivered: how the process dies when it never calls
// exit_group(). SIGKILL is skipped: the kernel turns a kill()ed fatal signal (SIGTERM, SIGINT,
// ...) into a group SIGKILL before delivery, and exit_group() and execve() kill sibling
// threads the same way, so a SIGKILL here does not name the cause. What remains is right:
// crash signals (SIGSEGV, SIGABRT, ...) and signals that were blocked when sent.
TRACEPOINT_PROBE(signal, signal_deliver)
{
    int sig = args->sig;
    if (args->sa_handler != 0 || sig <= 0 || sig > 64 || sig == 9)
        return 0;
    if (sig < 32 && ((NONFATAL_DEFAULT_MASK >> sig) & 1))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exit_status *st = statuses.lookup(&tgid);
    if (st) {
        if (!(st->flags & F_SIGNAL)) {
            st->sig = sig;
            st->flags |= F_SIGNAL;
        }
        return 0;
    }
    struct exit_status fresh = {.sig = sig, .flags = F_SIGNAL};
    statuses.update(&tgid, &fresh);
    return 0;
}

// Runs in the exiting task. A process exit is counted when its group leader (pid == tgid)
// exits; `group_dead` would say when the last thread goes but is missing from older kernels.
// Known inexactness: a leader that exits before its threads, or is reaped by a non-leader
// thread's execve(), is counted at that moment.
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 cgid = bpf_get_current_cgroup_id();
    u32 zero = 0;
    u64 *cfg = config.lookup(&zero);
    u64 short_ns = (cfg && *cfg) ? *cfg : DEFAULT_SHORT_NS;

    struct record r = {};
    r.kind = REC_EXIT;
    r.ts = now;
    r.cgroup_id = cgid;
    r.pid = tgid;
    int short_exit = 0, stream = 1;
    struct task_info *info = tasks.lookup(&tgid);
    if (info) {
        r.ppid = info->creator;
        r.lifetime_ns = now - info->start_ns;
        r.flags |= F_LIFETIME;
        if (r.lifetime_ns < short_ns) {
            if (info->execd)
                short_exit = 1;
            else
                stream = 0;  // never exec'd and short: counted only, fork storms stay in kernel
        }
        tasks.delete(&tgid);
    } else {
        bump_health(H_UNTRACKED);
    }
    struct exit_status *st = statuses.lookup(&tgid);
    if (st) {
        r.exit_code = st->code;
        r.sig = st->sig;
        r.flags |= st->flags;
        statuses.delete(&tgid);
    }
    account(r.ppid, cgid, C_EXITS, short_exit);
    if (stream) {
        bpf_get_current_comm(&r.comm, sizeof(r.comm));
        emit(args, &r, H_DROP_EXIT);
    }
    return 0;
}
