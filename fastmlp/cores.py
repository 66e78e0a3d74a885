"""How many cores this process may keep busy at once, beyond the ones it may
run on (os.sched_getaffinity, which Numba's default thread count follows):
a cgroup's CPU quota."""
import os

# where cgroups are mounted, and where this process says which it is in
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def cpu_quota():
    """How many CPUs' time this process's cgroups allow (a CFS quota over its
    period, rounded up; the smallest along the cgroup's path to the root),
    or None: no quota, or none readable. A container run with `--cpus=2` on
    a 64-core host sees 64 cores, and Numba starts 64 threads; on more
    threads than the quota pays for, the step's spin barriers wait for
    throttled threads. (A short probe run may fall in a moment before the
    throttling and time them as fast.) cgroup v2 keeps a quota in
    `cpu.max` ("quota period", or "max period" for none); v1 in
    `cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us`."""
    quotas = []
    for directory in cgroup_directories():
        quota = read_quota(directory)
        if quota is not None:
            quotas.append(quota)
    return min(quotas) if quotas else None


def cgroup_directories():
    """The directories of this process's cgroups that may hold a CPU quota,
    each with its parents up to the mount point: v2's (line "0::PATH" of
    /proc/self/cgroup, under CGROUP_ROOT) and v1's cpu controller's (under
    CGROUP_ROOT/cpu). Inside a container's own cgroup namespace PATH is "/"."""
    paths = []
    try:
        with open(PROC_CGROUP) as f:
            for line in f:
                number, controllers, path = line.rstrip("\n").split(":", 2)
                if number == "0" and controllers == "":
                    paths.append((CGROUP_ROOT, path))
                elif "cpu" in controllers.split(","):
                    paths.append((os.path.join(CGROUP_ROOT, "cpu"), path))
    except (OSError, ValueError):
        paths = [(CGROUP_ROOT, "/"), (os.path.join(CGROUP_ROOT, "cpu"), "/")]
    directories = []
    for mount, path in paths:
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            directories.append(os.path.join(mount, *parts[:depth]))
    return directories


def read_quota(directory):
    """The quota in directory's cpu.max or cpu.cfs_* files, in CPUs rounded
    up; None where it holds none."""
    try:
        with open(os.path.join(directory, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
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
