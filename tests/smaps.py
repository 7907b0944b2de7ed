"""What a test reads from /proc/self/smaps: the resident pages of one file's mappings."""

import re


def mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path`."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total
