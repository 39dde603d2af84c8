// TCP connections per process and cgroup: opens, closes, short-lived ones, retransmits,
// aggregated in the kernel. Tracepoint fields and helpers only (sock:inet_sock_set_state,
// tcp:tcp_retransmit_skb): the socket's address `skaddr` is used as a map key, never read.
//
// Attribution. Most transitions run in softirq or timer context, where "current" is whoever
// was interrupted. A socket's owner is therefore recorded only where the kernel guarantees
// the owner's context, keyed by skaddr, and every later event looks the owner up:
//   CLOSE -> SYN_SENT                  connect() (tcp_v4_connect / tcp_v6_connect)
//   ESTABLISHED|SYN_RECV -> FIN_WAIT1  close()/shutdown() by the holder (tcp_close_state)
//   CLOSE_WAIT -> LAST_ACK             close()/shutdown() by the holder (tcp_close_state)
// An accepted socket (created in softirq as LISTEN -> SYN_RECV) has no owner until its
// holder closes it; events on it before then count as unattributed. A socket that reaches
// CLOSE frees its entry, so a reused address never inherits an owner.
//
// Compile-time settings (-D): SOCK_ENTRIES, TGID_ENTRIES, CGROUP_ENTRIES, REMOTE_ENTRIES,
// DEFAULT_SHORT_NS.

#define IPPROTO_TCP_ 6
#define AF_INET_ 2
#define AF_INET6_ 10

// include/net/tcp_states.h
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_FIN_WAIT1 4
#define ST_FIN_WAIT2 5
#define ST_CLOSE 7
#define ST_CLOSE_WAIT 8
#define ST_LAST_ACK 9
#define ST_LISTEN 10
#define ST_CLOSING 11

#ifndef SOCK_ENTRIES
#define SOCK_ENTRIES 65536
#endif
#ifndef TGID_ENTRIES
#define TGID_ENTRIES 16384
#endif
#ifndef CGROUP_ENTRIES
#define CGROUP_ENTRIES 4096
#endif
#ifndef REMOTE_ENTRIES
#define REMOTE_ENTRIES 8192
#endif
#ifndef DEFAULT_SHORT_NS
#define DEFAULT_SHORT_NS 1000000000ULL
#endif

// Counter slots, in NetCounts order (linnixd/model.py).
#define C_CONNECTS 0      // active opens: connect() moved the socket to SYN_SENT
#define C_FAILED 1        // active opens closed before ESTABLISHED (refused, timed out, no port)
#define C_ACCEPTS 2       // accepted connections, counted when their holder became known
#define C_CLOSED 3        // attributed connections that reached CLOSE
#define C_SHORT 4         // ... of which younger than the short-lived threshold
#define C_RETRANS 5       // retransmitted segments
#define C_ACTIVE_CLOSED 6 // active opens that reached CLOSE (connects - this = still open)
#define C_TIME_WAIT 7     // active opens closed from FIN_WAIT1/FIN_WAIT2/CLOSING: closed first
#define NCOUNTS 8

// Remote endpoint counter slots.
#define R_CONNECTS 0
#define R_RETRANS 1
#define NREMOTE 2

// Health slots (per-CPU, monotonic).
#define H_OVERFLOW 0          // a map refused an insert (full)
#define H_UNTRACKED_CLOSE 1   // CLOSE of a socket opened before attach (or not recorded)
#define H_UNOWNED_CLOSE 2     // accepted socket closed without its holder becoming known
#define H_UNATTR_RETRANS 3    // retransmit on a socket with no known owner
#define H_OTHER_PROTO 4       // state changes of MPTCP/SCTP sockets (not counted)
#define NHEALTH 5

#define F_ACTIVE 1   // opened by connect()
#define F_KNOWN 2    // owner (tgid, cgroup) recorded in the owner's context

struct sock_owner {
    u64 start_ns;
    u64 cgroup_id;
    u32 tgid;
    u32 flags;
};

struct net_counts {
    u64 v[NCOUNTS];
};

// Layout shared with linnixd/collector/net.py (RemoteKey); no padding.
struct remote_key {
    u64 cgroup_id;
    u32 tgid;
    u16 family;
    u16 port;
    u8 addr[16];          // IPv4: first 4 bytes
};

struct remote_counts {
    u64 v[NREMOTE];
};

BPF_HASH(socks, u64, struct sock_owner, SOCK_ENTRIES);
BPF_HASH(by_tgid, u32, struct net_counts, TGID_ENTRIES);
BPF_HASH(by_cgroup, u64, struct net_counts, CGROUP_ENTRIES);
BPF_HASH(by_remote, struct remote_key, struct remote_counts, REMOTE_ENTRIES);
// Keys whose counters changed since user space last looked: it reads only these.
BPF_HASH(dirty_tgid, u32, u8, TGID_ENTRIES);
BPF_HASH(dirty_cgroup, u64, u8, CGROUP_ENTRIES);
BPF_HASH(dirty_remote, struct remote_key, u8, REMOTE_ENTRIES);
BPF_PERCPU_ARRAY(totals, struct net_counts, 1);  // whole host, attributed or not
BPF_PERCPU_ARRAY(health, u64, NHEALTH);
BPF_ARRAY(config, u64, 1);  // [0]: short-lived threshold in ns, 0 = DEFAULT_SHORT_NS

static __always_inline void bump_health(u32 slot)
{
    u64 *h = health.lookup(&slot);
    if (h)
        (*h)++;
}

static __always_inline void add_slots(struct net_counts *c, u32 mask, int atomic)
{
#pragma unroll
    for (int i = 0; i < NCOUNTS; i++) {
        if (mask & (1U << i)) {
            if (atomic)
                __sync_fetch_and_add(&c->v[i], 1);
            else
                c->v[i]++;
        }
    }
}

static __always_inline void add_total(u32 mask)
{
    u32 zero = 0;
    struct net_counts *t = totals.lookup(&zero);
    if (t)
        add_slots(t, mask, 0);  // per-CPU: no atomics needed
}

// Count the slots in `mask` for the host, the owning tgid and its cgroup.
static __always_inline void account(u32 tgid, u64 cgid, u32 mask)
{
    struct net_counts empty = {};
    u8 one = 1;
    add_total(mask);
    struct net_counts *p = by_tgid.lookup_or_try_init(&tgid, &empty);
    if (p) {
        add_slots(p, mask, 1);
        if (!dirty_tgid.lookup(&tgid) && dirty_tgid.update(&tgid, &one) < 0)
            bump_health(H_OVERFLOW);
    } else {
        bump_health(H_OVERFLOW);
    }
    struct net_counts *c = by_cgroup.lookup_or_try_init(&cgid, &empty);
    if (c) {
        add_slots(c, mask, 1);
        if (!dirty_cgroup.lookup(&cgid) && dirty_cgroup.update(&cgid, &one) < 0)
            bump_health(H_OVERFLOW);
    } else {
        bump_health(H_OVERFLOW);
    }
}

static __always_inline void account_remote(struct remote_key *k, int slot)
{
    struct remote_counts empty = {};
    u8 one = 1;
    struct remote_counts *r = by_remote.lookup_or_try_init(k, &empty);
    if (!r) {
        bump_health(H_OVERFLOW);
        return;
    }
    if (slot == R_CONNECTS)
        __sync_fetch_and_add(&r->v[R_CONNECTS], 1);
    else
        __sync_fetch_and_add(&r->v[R_RETRANS], 1);
    if (!dirty_remote.lookup(k) && dirty_remote.update(k, &one) < 0)
        bump_health(H_OVERFLOW);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP_) {
        bump_health(H_OTHER_PROTO);
        return 0;
    }
    u64 sk = (u64)args->skaddr;
    int oldstate = args->oldstate;
    int newstate = args->newstate;

    if (newstate == ST_SYN_SENT) {
        // connect(): the owner's context. sport is not chosen yet; dport/daddr are.
        u64 id = bpf_get_current_pid_tgid();
        struct sock_owner o = {};
        o.start_ns = bpf_ktime_get_ns();
        o.cgroup_id = bpf_get_current_cgroup_id();
        o.tgid = id >> 32;
        o.flags = F_ACTIVE | F_KNOWN;
        if (socks.update(&sk, &o) < 0)
            bump_health(H_OVERFLOW);
        account(o.tgid, o.cgroup_id, 1U << C_CONNECTS);
        struct remote_key k = {};
        k.cgroup_id = o.cgroup_id;
        k.tgid = o.tgid;
        k.family = args->family;
        k.port = args->dport;
        if (args->family == AF_INET6_)
            __builtin_memcpy(k.addr, args->daddr_v6, 16);
        else
            __builtin_memcpy(k.addr, args->daddr, 4);
        account_remote(&k, R_CONNECTS);
        return 0;
    }

    if (newstate == ST_SYN_RECV && oldstate == ST_LISTEN) {
        // A child of a listener, created in softirq: its holder is not known yet.
        struct sock_owner o = {};
        o.start_ns = bpf_ktime_get_ns();
        if (socks.update(&sk, &o) < 0)
            bump_health(H_OVERFLOW);
        return 0;
    }

    if ((newstate == ST_FIN_WAIT1 && (oldstate == ST_ESTABLISHED || oldstate == ST_SYN_RECV)) ||
        (newstate == ST_LAST_ACK && oldstate == ST_CLOSE_WAIT)) {
        // close()/shutdown() by the socket's holder: learn the owner of an accepted socket.
        struct sock_owner *o = socks.lookup(&sk);
        if (o && !(o->flags & F_KNOWN)) {
            o->tgid = bpf_get_current_pid_tgid() >> 32;
            o->cgroup_id = bpf_get_current_cgroup_id();
            o->flags |= F_KNOWN;
            account(o->tgid, o->cgroup_id, 1U << C_ACCEPTS);
        }
        return 0;
    }

    if (newstate != ST_CLOSE)
        return 0;

    struct sock_owner *found = socks.lookup(&sk);
    if (!found) {
        if (oldstate != ST_LISTEN)
            bump_health(H_UNTRACKED_CLOSE);
        return 0;
    }
    struct sock_owner o = *found;
    socks.delete(&sk);
    if (!(o.flags & F_KNOWN)) {
        bump_health(H_UNOWNED_CLOSE);
        add_total(1U << C_CLOSED);
        return 0;
    }
    u32 zero = 0;
    u64 *cfg = config.lookup(&zero);
    u64 short_ns = (cfg && *cfg) ? *cfg : DEFAULT_SHORT_NS;
    u32 mask = 1U << C_CLOSED;
    if (bpf_ktime_get_ns() - o.start_ns < short_ns)
        mask |= 1U << C_SHORT;
    if (o.flags & F_ACTIVE) {
        mask |= 1U << C_ACTIVE_CLOSED;
        if (oldstate == ST_SYN_SENT)
            mask |= 1U << C_FAILED;
        // closed first: its ephemeral port stays in TIME_WAIT (a server's stays on its listen port)
        if (oldstate == ST_FIN_WAIT1 || oldstate == ST_FIN_WAIT2 || oldstate == ST_CLOSING)
            mask |= 1U << C_TIME_WAIT;
    }
    account(o.tgid, o.cgroup_id, mask);
    return 0;
}

// Runs in softirq or timer context: the owner comes from the socket map only.
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u64 sk = (u64)args->skaddr;
    struct sock_owner *o = socks.lookup(&sk);
    if (!o || !(o->flags & F_KNOWN)) {
        add_total(1U << C_RETRANS);
        bump_health(H_UNATTR_RETRANS);
        return 0;
    }
    account(o->tgid, o->cgroup_id, 1U << C_RETRANS);
    struct remote_key k = {};
    k.cgroup_id = o->cgroup_id;
    k.tgid = o->tgid;
    k.family = args->family;
    k.port = args->dport;
    if (args->family == AF_INET6_)
        __builtin_memcpy(k.addr, args->daddr_v6, 16);
    else
        __builtin_memcpy(k.addr, args->daddr, 4);
    account_remote(&k, R_RETRANS);
    return 0;
}
