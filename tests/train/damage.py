"""Damage to a saved checkpoint's array files, for the tests of integrity checks and fallbacks."""

import glob
import os


def array_data_files(step_dir: str) -> list[str]:
    """The OCDBT data files of ``<step_dir>/state`` large enough to hold array values (small files may be b-tree
    nodes), largest first; fails if there are none, so a test never damages nothing."""
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    large = sorted((f for f in files if os.path.getsize(f) >= 4096), key=os.path.getsize, reverse=True)
    assert large, f"no array data files under {step_dir}/state: {files}"
    return large


def overwrite_throughout(path: str, every: int = 1024) -> None:
    """Overwrites 8 bytes every ``every`` bytes of ``path``, keeping its size: whichever arrays the file holds and in
    whatever order they were written, their values change (a single spot may land in bytes no array reads)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for offset in range(every // 2, size - 8, every):
            f.seek(offset)
            f.write(b"\x7f" * 8)
