"""Tries one thing a sandbox must stop (PROBE env var) and prints `RESULT <json>`."""

import json
import os
import socket
import time


def memory() -> dict:
    megabytes = int(os.environ["PROBE_MEGABYTES"])
    print(f"allocating {megabytes} MiB", flush=True)
    blocks = []
    for _ in range(megabytes):
        blocks.append(bytearray(1024 * 1024))  # zero-filled, so every page is touched
    return {"allocated_mb": megabytes}


def fork() -> dict:
    children = 0
    error = None
    for _ in range(int(os.environ["PROBE_FORKS"])):
        try:
            pid = os.fork()
        except OSError as failure:
            error = f"{type(failure).__name__}: errno {failure.errno}"
            break
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        children += 1
    return {"children": children, "error": error}


def network() -> dict:
    try:
        with socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=3):
            return {"connected": True}
    except OSError as failure:
        return {"connected": False, "error": f"{type(failure).__name__}: {failure}"}


def write() -> dict:
    outcomes = {}
    for path in [
        "/probe",
        "/app/probe",
        "/etc/probe",
        "/usr/probe",
        "/tmp/probe",
        "/dev/probe",
        "/.oldroot/probe",
        "/run/probe",
        "/run/vmflow/probe",
        "/scratch/probe",
    ]:
        try:
            with open(path, "w") as handle:
                handle.write("x")
            outcomes[path] = "written"
        except OSError as failure:
            outcomes[path] = f"{type(failure).__name__}: errno {failure.errno}"
    try:
        os.system("mount -o remount,rw / 2>/dev/null")
        with open("/probe-after-remount", "w") as handle:
            handle.write("x")
        outcomes["remount"] = "written"
    except OSError as failure:
        outcomes["remount"] = f"{type(failure).__name__}: errno {failure.errno}"
    # Field 5 of a mountinfo line is the mount point and field 6 its options.
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = {line.split()[4]: line.split()[5] for line in mountinfo}
    outcomes["mount_options"] = mounts
    outcomes["oldroot_exists"] = os.path.lexists("/.oldroot")
    return outcomes


def replace_io() -> dict:
    """Try to swap the gateway's files in /run/vmflow for symlinks to PROBE_TARGET."""
    outcomes = {}
    for name in ["output.log", "exit_status", "planted"]:
        path = f"/run/vmflow/{name}"
        try:
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink(os.environ["PROBE_TARGET"], path)
            outcomes[name] = "replaced"
        except OSError as failure:
            outcomes[name] = f"{type(failure).__name__}: errno {failure.errno}"
    return outcomes


probes = {"memory": memory, "fork": fork, "network": network, "write": write, "io": replace_io}
result = probes[os.environ["PROBE"]]()
print("RESULT " + json.dumps(result), flush=True)
time.sleep(600)
