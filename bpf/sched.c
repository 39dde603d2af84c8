// Scheduler evidence for stall attribution: run-queue wait per cgroup, preemptions between
// cgroups and a victim x culprit matrix of stall time, all aggregated in the kernel.
//
// Only tracepoint fields and helpers are used (no kernel struct is ever dereferenced).
//
// Method
// ------
// Per task (tasks): when it became runnable and on which CPU (set at sched_wakeup /
// sched_wakeup_new with target_cpu, and at sched_switch when prev leaves still runnable), and
// the cgroup it had when it was last current. Entries are updated in place.
// Per CPU (cpus): the task running now and since when, a ring of the last NSEG run segments
// (cgroup, start, end), the "pending" attribution of the task running now and the counters.
//
// At sched_switch (this CPU, time now), current == prev, so bpf_get_current_cgroup_id() is
// prev's cgroup exactly. That gives two exact facts without any pid -> cgroup guess:
//  1. prev's run segment [since, now] belongs to that cgroup: pushed into the CPU's ring;
//  2. the task that was switched in at the previous sched_switch on this CPU *is* prev, so
//     the wait it had then (and which cgroups it waited behind) is settled now under prev's
//     cgroup. Attribution is therefore deferred by one run slice.
// The chain breaks when a sched_switch is missed: a classic tracepoint program is skipped
// while bpf_prog_active is raised on the CPU, which happens whenever a task is preempted
// inside a bpf() map syscall (any BPF tool reading its maps). The pending wait is then settled
// with the task's last-seen cgroup from `tasks`; a task's entry is cleared at its last
// switch-out (exit) and reset by sched_wakeup_new, so a reused pid never inherits a cgroup.
// A task never seen as current has cgroup 0 there: its wait is counted as lost, never guessed.
// When next is switched in, its wait W = now - enqueue time is split over the segments in
// this CPU's ring that overlap [enqueue, now]: each overlapping cgroup gets the overlap.
//
// Approximations (what this gets wrong)
//  - Only the last NSEG segments are kept: the part of W older than the ring, and time the
//    CPU was idle (idle is never a culprit), is counted as unattributed, not guessed.
//  - Migrations: W is split over the CPU the task finally ran on. If it was woken on another
//    CPU (target_cpu differs) or pulled by load balancing, the segments it queued behind on
//    the first CPU are not seen and the segments on the final CPU before it arrived are
//    blamed. Such waits are counted (STAT_MIGRATED) so their share is known.
//  - A task woken while still running (sched_wakeup fires for it) leaves a stale enqueue
//    time; it is overwritten by the next wakeup or preemption before it can be used.
//  - The task map is direct-mapped: an array of TASK_ENTRIES (a power of two) slots, the slot
//    a function of pid modulo TASK_ENTRIES (see task_slot), each holding the full pid. An
//    array lookup is a lock-free address computation (a hash/LRU lookup hashes, locks on
//    insert and evicts), which was most of the cost per event. The price: two live pids that share a slot evict each other. The
//    slot's pid is always compared, so an evicted task is never given another task's enqueue
//    time or cgroup: its next switch-in counts as STAT_NO_ENQUEUE (its wait is not measured)
//    and a broken chain it is part of counts as lost; every eviction of a live task's slot
//    is counted (STAT_TASK_COLLISIONS). With pids below pid_max (32768 by default, 4194304
//    with systemd) and TASK_ENTRIES = 65536 that needs pid_max above 65536 and two pids
//    65536 apart both alive. Memory: TASK_ENTRIES x 40 bytes (2.5 MiB at 65536), fixed.
//    Two CPUs writing the same slot for two different pids at the same instant may tear it;
//    writes for the same pid race as they did with a hash (fields are updated in place).
// Counters live in the per-CPU `cpus` value (no separate map lookup on the hot path).
// Aggregates are per-CPU hashes: no atomics and no cache-line bouncing on the switch path;
// user space sums the CPUs. A cgroup's stall behind itself (the edge (cg, cg)) is kept in its
// runq value, so the common case of one cgroup's tasks queueing behind each other costs one
// hash lookup, not two; user space adds it to the (cg, cg) edge.
// Counters only grow; user space reads them each tick and computes deltas.
//
// CPU time per thread (what /proc/PID/stat's utime+stime would say, measured exactly)
// -----------------------------------------------------------------------------------
// prev's run segment [curr_start, now] is added to run_ns in its task slot at every
// switch-out (the slot is already in hand: no extra lookup on the hot path). User space reads
// only the slots of threads that ran: the first switch-out of a thread in each epoch (an
// epoch is one user-space read, `config[0]`) notes its pid in the `ran` hash, once per thread
// per epoch; user space drains `ran` with an atomic lookup-and-delete batch, then reads those
// slots plus the threads running right now (per-CPU curr_pid/curr_start: the open segment).
// A thread's last switch-out (exit) puts its final run_ns in `ran` itself, flagged dead, so
// a process that burns a CPU and exits between two reads is counted exactly. A `ran` insert
// refused because the map is full is counted (STAT_RAN_OVERFLOWS): that thread is read at its
// next switch-out of a later epoch (run_ns is cumulative), or its final time is lost if it was
// its exit. Run time of a segment whose switch-in was missed (see above) is not known.
//
// Attribution on demand
// ---------------------
// CPU time per thread is always kept. The stall attribution above (enqueue times, the segment
// ring, waits and edges) runs only while `config[1]` holds the time (bpf_ktime_get_ns) it was
// switched on; 0 switches it off, and sched_wakeup and sched_switch then return after the CPU
// time bookkeeping. User space switches it on while the host shows CPU pressure (see
// daemon.stall_attribution). A wait that began before the switch-on is not measured: it is
// counted (STAT_NO_ENQUEUE), never guessed, and that is what an episode's first moments lose.
// An enqueue time left from an earlier period is older than the switch-on and never used.

#define NSEG 8
// Index masked so that the verifier sees the bound on the very register used for the access.
// The empty asm hides the value from clang, which would otherwise drop a mask it can prove
// redundant (and 6.1's verifier then rejects the access as unbounded).
#define BOUNDED(x, n) ({ u64 _v = (x); asm volatile("" : "+r"(_v)); _v & ((n) - 1); })
#define NSLOTS 32

struct seg {
    u64 cg;
    u64 start;
    u64 end;
};

struct culprit_share {
    u64 cg;
    u64 ns;
};

enum stat {
    STAT_TASK_INSERTS = 0,  // tasks slots taken by a pid that did not hold them
    STAT_NO_ENQUEUE,        // switch-in of a task with no enqueue time (attach, slot evicted,
                            // queued before attribution was switched on)
    STAT_MIGRATED,          // waits that ended on another CPU than they were queued on
    STAT_UNATTRIBUTED_NS,   // wait not covered by a logged non-idle segment
    STAT_LOST_WAITS,        // waits whose task's cgroup could not be observed
    STAT_LOST_NS,
    STAT_OVERFLOWS,         // aggregate map inserts refused (map full)
    STAT_RECOVERED,         // broken-chain waits settled with the task's last-seen cgroup
    STAT_TASK_COLLISIONS,   // tasks slots taken from another live pid (its state is lost)
    STAT_RAN_OVERFLOWS,     // `ran` notes refused (map full)
    STAT_UNTIMED_RUNS,      // switch-outs whose switch-in was not seen (segment not timed)
    NSTATS,
};

struct cpu_state {
    u64 curr_start;  // when the running task was switched in (0 = not seen yet)
    u32 curr_pid;
    u32 head;        // next ring slot to write
    struct seg segs[NSEG];
    u32 pend_valid;     // the running task has something to settle at its switch-out
    u32 pend_has_wait;  // ... including a measured run-queue wait
    u32 pend_pid;
    u32 pad;
    u64 pend_wait;
    u64 pend_preempted_cg;  // cgroup it displaced while that was still runnable (0 = none)
    struct culprit_share pend[NSEG];
    u64 stats[NSTATS];  // enum stat, this CPU's part
};

struct task_val {
    u64 enq_ts;  // when it last became runnable (0 = not queued)
    u64 cg;      // cgroup when it was last current (0 = never seen current)
    u32 pid;     // owner of the slot (0 = free)
    u32 cpu;     // CPU it was queued on
    u64 run_ns;  // CPU time of this thread since it took the slot (completed segments)
    u32 tgid;    // its thread group, set when it is noted in `ran`
    u32 epoch;   // the epoch in which it was last noted in `ran`
};

// A thread that ran in the current epoch: live (read its slot) or dead (final time here).
struct ran_val {
    u64 run_ns;  // dead: the thread's whole CPU time in its slot; live: unused
    u32 tgid;
    u32 dead;
};

struct runq_val {
    u64 wait_ns;
    u64 waits;
    u64 self_ns;       // stall behind its own cgroup: the edge (cg, cg), kept here to save a lookup
    u64 hist[NSLOTS];  // log2 of the wait in microseconds
};

struct edge_key {
    u64 victim;
    u64 culprit;
};

struct edge_val {
    u64 stall_ns;
    u64 preemptions;  // victim preempted by culprit (victim still runnable)
};

BPF_ARRAY(tasks, struct task_val, TASK_ENTRIES);
BPF_PERCPU_ARRAY(cpus, struct cpu_state, 1);
BPF_PERCPU_HASH(runq, u64, struct runq_val, AGG_ENTRIES);
BPF_PERCPU_HASH(edges, struct edge_key, struct edge_val, AGG_ENTRIES);
BPF_HASH(ran, u32, struct ran_val, RAN_ENTRIES);
// [0]: the current epoch (user space bumps it at every read); [1]: attribution on since (ns, 0 = off)
BPF_ARRAY(config, u64, 2);

static __always_inline struct cpu_state *this_cpu(void)
{
    u32 zero = 0;
    return cpus.lookup(&zero);
}

static __always_inline void stat_add(struct cpu_state *st, u32 idx, u64 v)
{
    st->stats[idx] += v;  // idx is a constant at every call site
}

static __always_inline struct task_val *task_slot(u32 pid)
{
    // A multiply by an odd constant permutes the low bits: pids collide exactly when they are
    // equal modulo TASK_ENTRIES (as with pid & mask), but consecutive pids (a parent and its
    // children, two sides of a pipe) land on different cache lines instead of sharing one
    // that their CPUs would then bounce between them (measured: ~60 ns per sched_switch).
    u32 idx = (pid * 2654435761u) & (TASK_ENTRIES - 1);
    return tasks.lookup(&idx);
}

// Give the slot to pid: everything a previous owner left is replaced (counted if it was alive).
static __always_inline void task_claim(struct task_val *t, u32 pid)
{
    if (t->pid == pid)
        return;
    struct cpu_state *st = this_cpu();  // only here: wakeups need no per-CPU state otherwise
    if (st) {
        stat_add(st, STAT_TASK_INSERTS, 1);
        if (t->pid)
            stat_add(st, STAT_TASK_COLLISIONS, 1);
    }
    t->pid = pid;
    t->cg = 0;
    t->enq_ts = 0;
    t->run_ns = 0;
    t->epoch = 0;
}

static __always_inline void mark_enqueued(u32 pid, u32 cpu, u64 now, int fresh)
{
    struct task_val *t = task_slot(pid);
    if (!t)
        return;
    task_claim(t, pid);
    if (fresh) {  // a new task: whatever a previous owner of this pid left behind is dropped
        t->cg = 0;
        t->run_ns = 0;
        t->epoch = 0;
    }
    t->enq_ts = now;
    t->cpu = cpu;
}

static __always_inline struct edge_val *edge_get(struct cpu_state *st, u64 victim, u64 culprit)
{
    struct edge_key k = {.victim = victim, .culprit = culprit};
    struct edge_val zero = {};
    struct edge_val *e = edges.lookup(&k);
    if (e)
        return e;
    if (edges.insert(&k, &zero) != 0 && !edges.lookup(&k)) {
        stat_add(st, STAT_OVERFLOWS, 1);
        return 0;
    }
    return edges.lookup(&k);
}

// Settle the wait of the task that ran since the previous switch on this CPU, now that its
// cgroup (the current one) is known.
static __always_inline void settle(struct cpu_state *st, u64 victim)
{
    if (st->pend_preempted_cg && st->pend_preempted_cg != victim) {
        struct edge_val *p = edge_get(st, st->pend_preempted_cg, victim);
        if (p)
            p->preemptions++;
    }
    if (!st->pend_has_wait)
        return;
    u64 w = st->pend_wait;
    struct runq_val *r = runq.lookup(&victim);
    if (!r) {
        struct runq_val zero = {};
        if (runq.insert(&victim, &zero) != 0 && !runq.lookup(&victim))
            stat_add(st, STAT_OVERFLOWS, 1);
        r = runq.lookup(&victim);
    }
    if (r) {
        u64 us = w / 1000;
        u32 slot = us ? bpf_log2l(us) : 0;
        if (slot >= NSLOTS)
            slot = NSLOTS - 1;
        r->wait_ns += w;
        r->waits++;
        r->hist[BOUNDED(slot, NSLOTS)]++;
    }
    // Every slot is visited, unused ones are empty: a trip count depending on a loaded value
    // (clang folds "i < n" into the loop) is a loop 6.1's verifier cannot bound.
    for (int i = 0; i < NSEG; i++) {
        if (st->pend[i].ns == 0)
            continue;
        if (r && st->pend[i].cg == victim) {
            r->self_ns += st->pend[i].ns;
            continue;
        }
        struct edge_val *e = edge_get(st, victim, st->pend[i].cg);
        if (e)
            e->stall_ns += st->pend[i].ns;
    }
}

// Split the wait [t0, now] of the task being switched in over this CPU's logged segments,
// one pending share per distinct cgroup (so settle() touches each edge once), unused shares
// empty. The ring is in time order, so the walk goes newest first and stops at the first
// segment ending before t0.
static __always_inline u64 split_wait(struct cpu_state *st, u64 t0, u64 now)
{
    u64 covered = 0;
    u32 n = 0;
    u32 h = st->head;
    for (int i = 0; i < NSEG; i++)
        st->pend[i].ns = 0;
    for (int k = 1; k <= NSEG; k++) {
        struct seg *s = &st->segs[(h - k) & (NSEG - 1)];
        if (!s->end || s->end <= t0)
            break;
        u64 a = s->start > t0 ? s->start : t0;
        u64 b = s->end < now ? s->end : now;
        if (b <= a)
            continue;
        u32 slot = n;
        for (int j = 0; j < NSEG - 1; j++) {
            if (st->pend[j].ns && st->pend[j].cg == s->cg) {
                slot = j;
                break;
            }
        }
        if (slot == n) {
            st->pend[BOUNDED(slot, NSEG)].cg = s->cg;
            n++;
        }
        st->pend[BOUNDED(slot, NSEG)].ns += b - a;
        covered += b - a;
    }
    return covered;
}

// Note a thread in `ran`: live notes never replace an entry (a dead one carries a final time),
// dead notes always do.
static __always_inline void ran_note(struct cpu_state *st, u32 pid, u32 tgid, u64 run_ns, u32 dead)
{
    struct ran_val v = {.run_ns = run_ns, .tgid = tgid, .dead = dead};
    if (dead) {
        if (ran.update(&pid, &v) != 0)
            stat_add(st, STAT_RAN_OVERFLOWS, 1);
    } else if (ran.insert(&pid, &v) != 0 && !ran.lookup(&pid)) {
        stat_add(st, STAT_RAN_OVERFLOWS, 1);
    }
}

static __always_inline u32 current_epoch(void)
{
    u32 zero = 0;
    u64 *e = config.lookup(&zero);
    return e ? (u32)*e : 0;
}

static __always_inline u64 attributing_since(void)
{
    u32 one = 1;
    u64 *v = config.lookup(&one);
    return v ? *v : 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    if (!attributing_since())
        return 0;  // an enqueue time is only used by the attribution
    mark_enqueued(args->pid, args->target_cpu, bpf_ktime_get_ns(), 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_enqueued(args->pid, args->target_cpu, bpf_ktime_get_ns(), 1);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    struct cpu_state *st = this_cpu();
    if (!st)
        return 0;
    u32 prev = args->prev_pid;
    u32 next = args->next_pid;
    u64 cg = bpf_get_current_cgroup_id();  // prev's cgroup: prev is current here
    long state = args->prev_state;
    u64 since = attributing_since();

    if (st->pend_valid && !since) {
        st->pend_valid = 0;  // switched off meanwhile: nothing is settled
    } else if (st->pend_valid) {
        u32 pend = st->pend_pid;
        if (pend == prev) {
            settle(st, cg);
        } else {
            struct task_val *t = task_slot(pend);
            if (t && t->pid == pend && t->cg) {
                stat_add(st, STAT_RECOVERED, 1);
                settle(st, t->cg);
            } else if (st->pend_has_wait) {
                stat_add(st, STAT_LOST_WAITS, 1);
                stat_add(st, STAT_LOST_NS, st->pend_wait);
            }
        }
        st->pend_valid = 0;
    }

    u64 preempted_cg = 0;
    u32 cpu = bpf_get_smp_processor_id();
    if (prev != 0) {
        u64 seg = 0;
        if (st->curr_start && st->curr_pid == prev) {
            seg = now - st->curr_start;
        } else {
            stat_add(st, STAT_UNTIMED_RUNS, 1);
        }
        if (seg && since) {
            u32 h = st->head;
            struct seg *last = &st->segs[(h - 1) & (NSEG - 1)];
            // Contiguous run of the same cgroup: extend instead of using a slot.
            if (last->cg == cg && last->end == st->curr_start) {
                last->end = now;
            } else {
                struct seg *s = &st->segs[BOUNDED(h, NSEG)];
                s->cg = cg;
                s->start = st->curr_start;
                s->end = now;
                st->head = h + 1;
            }
        }
        // Still runnable: TASK_RUNNING (0) or the preempted marker TASK_REPORT_MAX.
        int runnable = (state & (TASK_REPORT_MAX - 1)) == 0;
        struct task_val *t = task_slot(prev);
        if (t) {
            if (state & (TASK_STATE_X | TASK_STATE_Z)) {
                // its last switch-out: hand over its CPU time; the pid may be reused from now on
                u32 tgid = bpf_get_current_pid_tgid() >> 32;
                u64 total = seg;
                if (t->pid == prev) {
                    total += t->run_ns;
                    t->pid = 0;
                    t->cg = 0;
                    t->enq_ts = 0;
                    t->run_ns = 0;
                    t->epoch = 0;
                }
                ran_note(st, prev, tgid, total, 1);
            } else {
                task_claim(t, prev);
                t->run_ns += seg;
                if (t->cg != cg)  // unchanged most of the time: do not dirty a shared line
                    t->cg = cg;
                if (runnable && since) {
                    t->enq_ts = now;
                    t->cpu = cpu;
                }
                u32 epoch = current_epoch();
                if (t->epoch != epoch) {  // first switch-out this epoch: once per thread per read
                    t->epoch = epoch;
                    t->tgid = bpf_get_current_pid_tgid() >> 32;
                    ran_note(st, prev, t->tgid, 0, 0);
                }
            }
        }
        if (runnable)
            preempted_cg = cg;
    }

    st->curr_pid = next;
    st->curr_start = now;
    if (next == 0 || !since)
        return 0;
    st->pend_preempted_cg = preempted_cg;
    st->pend_pid = next;
    st->pend_valid = 1;
    st->pend_has_wait = 0;
    struct task_val *t = task_slot(next);
    // since > 0 here: an enqueue time of 0, or one from before the switch-on, is not a wait
    if (!t || t->pid != next || t->enq_ts < since) {
        stat_add(st, STAT_NO_ENQUEUE, 1);
        return 0;
    }
    u64 t0 = t->enq_ts;
    t->enq_ts = 0;
    if (t->cpu != cpu)
        stat_add(st, STAT_MIGRATED, 1);
    if (t0 > now)
        t0 = now;
    u64 w = now - t0;
    st->pend_wait = w;
    st->pend_has_wait = 1;
    u64 covered = split_wait(st, t0, now);
    if (w > covered)
        stat_add(st, STAT_UNATTRIBUTED_NS, w - covered);
    return 0;
}
