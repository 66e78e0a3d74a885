"""How many cores this process may keep busy at once, beyond the ones it may
run on (os.sched_getaffinity, which Numba's default thread count follows):
a cgroup's CPU quota."""

# where a cgroup's CPU quota is kept: v2's cpu.max ("quota period", or "max
# period" for none); v1's cfs_quota_us (-1 for none) and cfs_period_us
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_CFS_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_CFS_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def cpu_quota():
    """How many CPUs' time this process's cgroup allows (its CFS quota over
    its period, rounded up), or None: no quota, or none readable. A
    container run with `--cpus=2` on a 64-core host sees 64 cores, and
    Numba starts 64 threads; on more threads than the quota pays for, the
    step's spin barriers wait for throttled threads. (A short probe run may
    fall in a moment before the throttling and time them as fast.)"""
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open(CGROUP_CFS_QUOTA) as f:
                quota = f.read().strip()
            with open(CGROUP_CFS_PERIOD) as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        quota, period = int(quota), int(period)
    except ValueError:  # "max"
        return None
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)
