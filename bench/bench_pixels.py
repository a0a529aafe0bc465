"""Decode cost of `read_instance` against bare pydicom, per image, on phantom files of every site's transfer syntax.

Target: for uncompressed data, `read_instance` within 1.5x of bare `pydicom.dcmread(f).pixel_array`.
Run: `.venv/bin/python bench/bench_pixels.py [--per-group 12] [--repeats 5]`

Files: the phantom's radiographs and CT slices of every site (explicit and implicit VR little endian, RLE,
JPEG-LS, JPEG 2000), and real scanners' files from pydicom-data (large CR radiographs, CT, MR; uncompressed and
JPEG 2000).

Three timings per file, each reading the file from disk (the page cache is warm: every file is read once first):
- `pixel_array`: `pydicom.dcmread(f).pixel_array`, the bare floor;
- `+ modality LUT`: the same plus `pydicom.pixels.apply_modality_lut` (float64), what a careful caller writes by hand;
- `read_instance`: float32 physical values, MONOCHROME1 inverted, windows, spacing and plane parsed.
Each figure is the median over files of the per-file median over repeats, in milliseconds.
"""
import argparse, os, sys, time, tempfile, shutil, statistics, warnings
from pathlib import Path

warnings.filterwarnings('ignore')


def cohort(tmp):
    "Phantom radiographs (3 studies) and a chest CT series from every site: every site's transfer syntax occurs."
    from rwid_nb.data.phantom import generate_cohort, SITES
    roots = []
    for site in SITES:
        for mods, n in ((['CR', 'DX'], 3), (['CT'], 1)):
            root = Path(tmp)/f"{site}-{mods[0]}"
            generate_cohort(root, n_studies=n, seed=21, workers=1, progress=False, sites=[site], modalities=mods)
            roots.append(root)
    return roots


REAL_FILES = ('RG1_UNCR.dcm', 'RG1_J2KR.dcm', 'RG3_UNCR.dcm', 'RG3_J2KR.dcm', 'MR2_UNCR.dcm', 'MR2_J2KR.dcm',
              '693_UNCR.dcm', '693_J2KR.dcm', 'CT_small.dcm', 'MR_small_RLE.dcm')


def groups(roots, per_group):
    "(label, files) per modality kind x transfer syntax x photometric, `per_group` files each at most."
    import pandas as pd, pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import UID
    out = {}
    for root, r in ((root, r) for root in roots for _, r in pd.read_csv(root/'ground_truth.csv').iterrows()):
        kind = 'radiograph' if r.modality in ('CR', 'DX') else 'CT slice'
        files = sorted(p for p in (root/r.study_dir).rglob('*') if p.is_file())
        out.setdefault((kind, UID(r.transfer_syntax).name, r.photometric), []).extend(files)
    out = {k: v[:per_group] for k, v in sorted(out.items())}
    # real scanners' files from pydicom-data: large radiographs (MONOCHROME1), CT, MR, each uncompressed and compressed
    real = {}
    for name in REAL_FILES:
        try: f = Path(get_testdata_file(name, download=False))
        except Exception: continue
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        real.setdefault((f"real {ds.Modality} ({name.split('_')[0]})", UID(ds.file_meta.TransferSyntaxUID).name,
                         str(ds.PhotometricInterpretation)), []).append(f)
    return out | real


def timed(fn, f, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(f); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--per-group', type=int, default=12)
    ap.add_argument('--repeats', type=int, default=5)
    a = ap.parse_args()
    import numpy as np, pydicom
    from pydicom.pixels import apply_modality_lut
    from rwid_nb.data.dicom import read_instance
    def bare(f): return pydicom.dcmread(f).pixel_array
    def with_lut(f):
        ds = pydicom.dcmread(f); return apply_modality_lut(ds.pixel_array, ds)
    def ours(f): return read_instance(f).pixels
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; pydicom {pydicom.__version__}; numpy {np.__version__}")
    tmp = tempfile.mkdtemp(prefix='rwid-bench-pixels-')
    try:
        roots = cohort(tmp)
        rows = []
        for (kind, ts, pi), files in groups(roots, a.per_group).items():
            for f in files: ours(f)  # warm the page cache and the plugins
            t = {name: statistics.median(timed(fn, f, a.repeats) for f in files) * 1e3
                 for name, fn in (('bare', bare), ('lut', with_lut), ('ours', ours))}
            head = pydicom.dcmread(files[0], stop_before_pixels=True)
            shape = f"{head.Rows}x{head.Columns}"
            rows.append((kind, ts, pi, shape, len(files), t['bare'], t['lut'], t['ours']))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| image | transfer syntax | stored as | size | files | pixel_array ms | + modality LUT ms | read_instance ms | read_instance / pixel_array | target |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for kind, ts, pi, shape, n, b, l, o in rows:
        native = ts in ('Explicit VR Little Endian', 'Implicit VR Little Endian', 'Explicit VR Big Endian')
        verdict = ('met' if o/b <= 1.5 else 'MISSED') if native else '(compressed: no target)'
        print(f"| {kind} | {ts} | {pi} | {shape} | {n} | {b:.2f} | {l:.2f} | {o:.2f} | {o/b:.2f}x | {verdict} |")


if __name__ == '__main__':
    main()
