"""Phantom generation speed: studies per second on this machine, against the issue's target in the same run.

Target (issue 2): 1,000 studies in under 2 minutes on 2 cores, i.e. at least 8.33 studies/s.
Run: `.venv/bin/python bench/bench_phantom.py [--studies 1000] [--workers 2] [--repeats 1]`

Besides the end-to-end figure it times each modality's rendering on one core (median of a few studies), and a
baseline in the same run: writing the same number of bare uncompressed 512x512 DICOM files with pydicom, the floor
below which no generator that writes files through pydicom can go.
"""
import argparse, os, sys, time, tempfile, shutil, statistics
from pathlib import Path
import numpy as np


def bare_write_baseline(n_files, tmp):
    "Seconds to write n_files minimal uncompressed 512x512 uint16 DICOM files with pydicom (one process)."
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom import uid
    arr = np.zeros((512, 512), np.uint16).tobytes()
    t = time.perf_counter()
    for i in range(n_files):
        ds = Dataset(); ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        ds.SOPClassUID = '1.2.840.10008.5.1.4.1.1.1'; ds.SOPInstanceUID = f'2.25.{i+1}'
        ds.Rows = ds.Columns = 512; ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = 'MONOCHROME2'
        ds.BitsAllocated = 16; ds.BitsStored = 12; ds.HighBit = 11; ds.PixelRepresentation = 0
        ds.PixelData = arr
        pydicom.dcmwrite(Path(tmp)/f'{i}.dcm', ds, enforce_file_format=True)
    return time.perf_counter() - t


def per_modality(seed=3, n=5):
    "Median seconds to render one study of each modality in this process."
    from rwid_nb.data.phantom import plan_cohort, render_study, SITES
    plans = plan_cohort(600, seed)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for m in ('CR', 'DX', 'CT', 'MR', 'US'):
            ts = []
            for p in [p for p in plans if p.modality == m][:n]:
                t = time.perf_counter(); render_study(p, SITES[p.site_id], Path(d)/p.study_key, seed); ts.append(time.perf_counter() - t)
            out[m] = statistics.median(ts)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--studies', type=int, default=1000)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=1)
    a = ap.parse_args()
    from rwid_nb.data.phantom import generate_cohort
    target = 1000 / 120
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix='rwid-bench-'))
    try:
        for r in range(a.repeats):
            t = time.perf_counter()
            res = generate_cohort(tmp/f'c{r}', n_studies=a.studies, seed=100 + r, workers=a.workers, progress=False)
            dt = time.perf_counter() - t
            rows.append((dt, res['n_files']))
            shutil.rmtree(tmp/f'c{r}')
        dts = [x[0] for x in rows]
        med = statistics.median(dts)
        n_files = rows[0][1]
        (tmp/'bare').mkdir()
        n_base = min(n_files, 2000)
        base = bare_write_baseline(n_base, tmp/'bare') * n_files / n_base / a.workers
        mod = per_modality()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sps = a.studies / med
    print(f"\n| what | value |\n|---|---|")
    print(f"| studies | {a.studies} ({n_files} files), {a.workers} workers, {a.repeats} run(s) |")
    print(f"| wall time, median | {med:.1f} s |")
    print(f"| studies / s | {sps:.2f} |")
    print(f"| target (1000 studies in 120 s) | {target:.2f} studies/s |")
    print(f"| ratio to target | {sps/target:.2f}x ({'meets' if sps >= target else 'MISSES'} the target) |")
    print(f"| baseline: bare pydicom writes of {n_files} 512x512 files on {a.workers} cores | {base:.1f} s |")
    print(f"| generation / bare-write baseline | {med/base:.1f}x |")
    print("\n| modality | median render time per study, one core |\n|---|---|")
    for m, v in mod.items(): print(f"| {m} | {v*1000:.0f} ms |")


if __name__ == '__main__':
    main()
