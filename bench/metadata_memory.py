"""Peak memory of `predict --metadata` reading a 50 MB metadata CSV for a small folder (issue 29).

Writes a HAM10000-style CSV of about 50 MB (some 900,000 rows, seven columns) into a temporary
folder, reads it as predict does for a folder of 20 images (`batch.patient.read_metadata` with the
folder's files, then `join`), and prints the process's peak resident memory before and after.
The README quotes the figure; it must stay under 500 MB.

    python bench/metadata_memory.py
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's skinclf

SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest")


def write_csv(path: Path, megabytes: int = 50) -> int:
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
        while fh.tell() < megabytes * 1_000_000:
            fh.write(f"HAM_{rows:07d},ISIC_{rows:07d},nv,follow_up,{rows % 90 + 5}.0,"
                     f"{'male' if rows % 2 else 'female'},{SITES[rows % len(SITES)]}\n")
            rows += 1
    return rows


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> int:
    from skinclf.batch.patient import join, read_metadata

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metadata.csv"
        rows = write_csv(path)
        files = [f"ISIC_{i:07d}.jpg" for i in range(0, 20 * 40_000, 40_000)]  # 20 images spread over the file
        before = peak_mb()
        t0 = time.perf_counter()
        joined = join(read_metadata(path, files), files)
        seconds = time.perf_counter() - t0
        after = peak_mb()
        size = path.stat().st_size / 1e6
    print(f"{size:.0f} MB metadata CSV, {rows:,} rows, folder of {len(files)} images: "
          f"{len(joined.per_file)} joined, {joined.not_in_folder_count:,} rows not in the folder; "
          f"read in {seconds:.1f} s; peak memory {after:.0f} MB (before reading: {before:.0f} MB)")
    return 0 if after < 500 else 1


if __name__ == "__main__":
    sys.exit(main())
