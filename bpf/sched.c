// Scheduler evidence for stall attribution: run-queue wait per cgroup, preemptions between
// cgroups and a victim x culprit matrix of stall time, all aggregated in the kernel.
//
// Only tracepoint fields and helpers are used (no kernel struct is ever dereferenced).
//
// Method
// ------
// Per task (tasks, LRU): when it became runnable and on which CPU (set at sched_wakeup /
// sched_wakeup_new with target_cpu, and at sched_switch when prev leaves still runnable), and
// the cgroup it had when it was last current. Entries are updated in place: one lookup per
// task per switch, no allocation after a task's first event.
// Per CPU (cpus): the task running now and since when, a ring of the last NSEG run segments
// (cgroup, start, end) and the "pending" attribution of the task running now.
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
// with the task's last-seen cgroup from `tasks`; a task's entry is removed at its last
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
//  - The task map is an LRU: an entry evicted before its task runs shows up as a switch-in
//    without an enqueue time (STAT_NO_ENQUEUE); an LRU evicts silently, so that miss count
//    (and STAT_TASK_INSERTS against the capacity) is what can be observed, not each eviction.
// Aggregates are per-CPU hashes: no atomics and no cache-line bouncing on the switch path;
// user space sums the CPUs.
// Counters only grow; user space reads them each tick and computes deltas.

#define NSEG 8
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
};

struct task_val {
    u64 enq_ts;  // when it last became runnable (valid while queued)
    u64 cg;      // cgroup when it was last current (0 = never seen current)
    u32 cpu;     // CPU it was queued on
    u32 queued;
};

struct runq_val {
    u64 wait_ns;
    u64 waits;
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

enum stat {
    STAT_TASK_INSERTS = 0,  // new keys in tasks
    STAT_NO_ENQUEUE,        // switch-in of a task with no enqueue time (attach, LRU eviction)
    STAT_MIGRATED,          // waits that ended on another CPU than they were queued on
    STAT_UNATTRIBUTED_NS,   // wait not covered by a logged non-idle segment
    STAT_LOST_WAITS,        // waits whose task's cgroup could not be observed
    STAT_LOST_NS,
    STAT_OVERFLOWS,         // aggregate map inserts refused (map full)
    STAT_RECOVERED,         // broken-chain waits settled with the task's last-seen cgroup
    NSTATS,
};

BPF_TABLE("lru_hash", u32, struct task_val, tasks, TASK_ENTRIES);
BPF_PERCPU_ARRAY(cpus, struct cpu_state, 1);
BPF_PERCPU_HASH(runq, u64, struct runq_val, AGG_ENTRIES);
BPF_PERCPU_HASH(edges, struct edge_key, struct edge_val, AGG_ENTRIES);
BPF_PERCPU_ARRAY(stats, u64, NSTATS);

static __always_inline void stat_add(u32 idx, u64 v)
{
    u64 *c = stats.lookup(&idx);
    if (c)
        *c += v;
}

static __always_inline void task_insert(u32 pid, struct task_val *v)
{
    if (tasks.insert(&pid, v) == 0)
        stat_add(STAT_TASK_INSERTS, 1);
    else
        tasks.update(&pid, v);
}

static __always_inline void mark_enqueued(u32 pid, u32 cpu, u64 now)
{
    struct task_val *t = tasks.lookup(&pid);
    if (t) {
        t->enq_ts = now;
        t->cpu = cpu;
        t->queued = 1;
        return;
    }
    struct task_val v = {.enq_ts = now, .cpu = cpu, .queued = 1};
    task_insert(pid, &v);
}

static __always_inline struct edge_val *edge_get(u64 victim, u64 culprit)
{
    struct edge_key k = {.victim = victim, .culprit = culprit};
    struct edge_val zero = {};
    struct edge_val *e = edges.lookup(&k);
    if (e)
        return e;
    if (edges.insert(&k, &zero) != 0 && !edges.lookup(&k)) {
        stat_add(STAT_OVERFLOWS, 1);
        return 0;
    }
    return edges.lookup(&k);
}

// Settle the wait of the task that ran since the previous switch on this CPU, now that its
// cgroup (the current one) is known.
static __always_inline void settle(struct cpu_state *st, u64 victim)
{
    if (st->pend_preempted_cg && st->pend_preempted_cg != victim) {
        struct edge_val *p = edge_get(st->pend_preempted_cg, victim);
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
            stat_add(STAT_OVERFLOWS, 1);
        r = runq.lookup(&victim);
    }
    if (r) {
        u64 us = w / 1000;
        u32 slot = us ? bpf_log2l(us) : 0;
        if (slot >= NSLOTS)
            slot = NSLOTS - 1;
        r->wait_ns += w;
        r->waits++;
        r->hist[slot]++;
    }
    for (int i = 0; i < NSEG; i++) {
        if (st->pend[i].ns == 0)
            continue;
        struct edge_val *e = edge_get(victim, st->pend[i].cg);
        if (e)
            e->stall_ns += st->pend[i].ns;
    }
}

// Split the wait [t0, now] of the task being switched in over this CPU's logged segments,
// one pending share per distinct cgroup (so settle() touches each edge once).
static __always_inline u64 split_wait(struct cpu_state *st, u64 t0, u64 now)
{
    u64 covered = 0;
    for (int i = 0; i < NSEG; i++)
        st->pend[i].ns = 0;
    for (int i = 0; i < NSEG; i++) {
        struct seg *s = &st->segs[i];
        u64 a = s->start > t0 ? s->start : t0;
        u64 b = s->end < now ? s->end : now;
        if (!s->end || b <= a)
            continue;
        int slot = i;
        for (int j = 0; j < i; j++) {
            if (st->pend[j].ns && st->pend[j].cg == s->cg) {
                slot = j;
                break;
            }
        }
        st->pend[slot & (NSEG - 1)].cg = s->cg;
        st->pend[slot & (NSEG - 1)].ns += b - a;
        covered += b - a;
    }
    return covered;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_enqueued(args->pid, args->target_cpu, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    // A new task: whatever a previous owner of this pid left behind is replaced.
    struct task_val v = {.enq_ts = bpf_ktime_get_ns(), .cpu = args->target_cpu, .queued = 1};
    task_insert(args->pid, &v);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 cpu = bpf_get_smp_processor_id();
    u32 zero = 0;
    struct cpu_state *st = cpus.lookup(&zero);
    if (!st)
        return 0;
    u32 prev = args->prev_pid;
    u32 next = args->next_pid;
    u64 cg = bpf_get_current_cgroup_id();  // prev's cgroup: prev is current here
    long state = args->prev_state;

    if (st->pend_valid) {
        u32 pend = st->pend_pid;
        if (pend == prev) {
            settle(st, cg);
        } else {
            struct task_val *t = tasks.lookup(&pend);
            if (t && t->cg) {
                stat_add(STAT_RECOVERED, 1);
                settle(st, t->cg);
            } else if (st->pend_has_wait) {
                stat_add(STAT_LOST_WAITS, 1);
                stat_add(STAT_LOST_NS, st->pend_wait);
            }
        }
        st->pend_valid = 0;
    }

    u64 preempted_cg = 0;
    if (prev != 0) {
        if (st->curr_start && st->curr_pid == prev) {
            u32 h = st->head % NSEG;
            struct seg *last = &st->segs[(h + NSEG - 1) % NSEG];
            // Contiguous run of the same cgroup: extend instead of using a slot.
            if (last->cg == cg && last->end == st->curr_start) {
                last->end = now;
            } else {
                st->segs[h].cg = cg;
                st->segs[h].start = st->curr_start;
                st->segs[h].end = now;
                st->head = h + 1;
            }
        }
        // Still runnable: TASK_RUNNING (0) or the preempted marker TASK_REPORT_MAX.
        int runnable = (state & (TASK_REPORT_MAX - 1)) == 0;
        if (state & (TASK_STATE_X | TASK_STATE_Z)) {
            tasks.delete(&prev);  // its last switch-out: the pid may be reused from now on
        } else {
            struct task_val *t = tasks.lookup(&prev);
            if (t) {
                t->cg = cg;
                if (runnable) {
                    t->enq_ts = now;
                    t->cpu = cpu;
                    t->queued = 1;
                }
            } else {
                struct task_val v = {.enq_ts = now, .cg = cg, .cpu = cpu, .queued = runnable};
                task_insert(prev, &v);
            }
        }
        if (runnable)
            preempted_cg = cg;
    }

    st->curr_pid = next;
    st->curr_start = now;
    if (next == 0)
        return 0;
    st->pend_preempted_cg = preempted_cg;
    st->pend_pid = next;
    st->pend_valid = 1;
    st->pend_has_wait = 0;
    struct task_val *t = tasks.lookup(&next);
    if (!t || !t->queued) {
        stat_add(STAT_NO_ENQUEUE, 1);
        return 0;
    }
    t->queued = 0;
    u64 t0 = t->enq_ts;
    if (t->cpu != cpu)
        stat_add(STAT_MIGRATED, 1);
    if (t0 > now)
        t0 = now;
    u64 w = now - t0;
    st->pend_wait = w;
    st->pend_has_wait = 1;
    u64 covered = split_wait(st, t0, now);
    if (w > covered)
        stat_add(STAT_UNATTRIBUTED_NS, w - covered);
    return 0;
}
