"""linnixd: names the process, cgroup or service that makes a Linux host stall."""

__version__ = "0.1.0"
