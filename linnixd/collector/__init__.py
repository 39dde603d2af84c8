"""Collectors: read the kernel (BPF maps, /proc, cgroupfs, PSI) once per tick."""
