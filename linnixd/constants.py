"""Every external name linnixd uses: polkit action ids, files, exit codes, MESSAGE_IDs.

The D-Bus names (bus name, object path, interface, error names, signals) are in wire.py.
"""

from __future__ import annotations

# polkit action ids (polkit/org.linnix.linnixd1.policy)
POLKIT_READ = "org.linnix.linnixd1.read"
POLKIT_RELOAD = "org.linnix.linnixd1.reload-policy"
POLKIT_ENFORCEMENT = "org.linnix.linnixd1.manage-enforcement"
POLKIT_ACT = "org.linnix.linnixd1.act"

# Files
DEFAULT_POLICY_PATH = "/etc/linnixd/rules.yaml"
STATE_DIR = "/var/lib/linnixd"
HISTORY_DB = "alerts.sqlite3"
ENFORCEMENT_STATE = "enforcement.json"  # enabled / dry-run, who changed it last
ACTION_LEDGER = "actions.json"  # actions applied and not yet reverted

# Bounds of an enforcement action (policy actions and linnixctl throttle; api.throttle_problem)
MAX_CPU_PCT = 100.0 * 8192  # percent of one CPU, so up to Debian's NR_CPUS cores
MAX_ACTION_S = 86400.0  # an action is reverted within a day at the latest

# Exit codes (sysexits.h / systemd conventions)
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 64  # EX_USAGE: bad command line
EXIT_NOINPUT = 66  # EX_NOINPUT: no such incident (linnixctl explain)
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: daemon not running / bus not reachable
EXIT_SOFTWARE = 70  # EX_SOFTWARE: internal error
EXIT_OSERR = 71  # EX_OSERR: kernel feature missing (BTF, tracefs, headers, capability)
EXIT_NOPERM = 77  # EX_NOPERM: permission or polkit denial
EXIT_CONFIG = 78  # EX_CONFIG: invalid policy

# journald MESSAGE_IDs, one per rule, plus the resolved record and daemon lifecycle.
# Random 128-bit ids (uuid4); never change a published id: catalogs and filters key on them.
MESSAGE_IDS: dict[str, str] = {
    "fork_storm": "301d63e12dfa46339356beb38531e802",
    "short_lived_jobs": "53c48a37276040c987e14ff0b95cb633",
    "cpu_spike": "fbaacd0767d9442dbac5451e5d35fe5c",
    "runaway_tree": "016f0839ace24ae3ac1bd5c4e16a2fde",
    "memory_leak": "d181dee922e04062bece736f2f62d5c1",
    "fd_exhaustion": "0669c4b9272e4ff686c3ddf08da63f11",
    "psi_saturation": "403e2d2306a94e5c8b9f8af78c28e5c8",
    "noisy_neighbour": "a6cea7a6791b4d56a75c9acd080a402c",
    "circuit_breaker": "004ef9db839844c5af1ab11f2d05e086",
    "connection_churn": "29b9f0aaf38648ab9a4a82de160bcaf1",
    "tcp_retransmits": "6d6038d4e1424431a8b2fb9e9c3a332d",
    "port_exhaustion": "d08692288b0d490585fc46c2924aae17",
    "resolved": "aab3af1e1e7b4d5887441d10c3b82417",
    "daemon_started": "415b0639fff34864813a0862512e654a",
    "policy_reloaded": "415287513b5f4d0dabd80cad617de8a7",
    "enforcement_changed": "48cccced98a346abb898a4b732fd659d",
    "action_taken": "5665264aaf9e4667bfae86c0c62d291e",
    "action_reverted": "1a22f2d188df4eb294c8482edd799a44",
}

SEVERITY_PRIORITY = {"info": 6, "notice": 5, "warning": 4, "critical": 2}

# "some" pressure (percent) above which the host is not calm and a cgroup subtree is looked into
PRESSURE_GATE_PCT = 5.0
KTHREADD_PID = 2  # the parent of every kernel thread (in the initial pid namespace)
