"""Preprocessing speed: `preprocess` (decode, resample, quantise, hash, write shards) against a bare decode loop.

Target (shards issue): preprocessing throughput within 1.5x of bare decoding, i.e. `pydicom.dcmread(f).pixel_array`
over the same files with the same number of worker processes.
Run: `.venv/bin/python bench/bench_preprocess.py [--studies 300] [--workers 2] [--repeats 3] [--cache DIR]`

The cohort is generated and indexed once into `<cache_root>/bench-preprocess/` and reused. Every measurement runs in
a fresh Python process after the imports it needs, on both sides (pydicom for the bare loop; torch and the
project's modules for `preprocess`): an import happens once per run, whatever its size, and is not what is measured.
Each run comes after a pass that reads every file, so the page cache is equally warm.
"""
import argparse, os, sys, json, time, shutil, resource, subprocess, tempfile, statistics
from pathlib import Path

SECRET = b'bench-preprocess-secret-0123456789'


def _bare_chunk(paths):
    import warnings, pydicom
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for p in paths:
            try: pydicom.dcmread(p).pixel_array; n += 1
            except Exception: pass
    return n


def child(a):
    cpu = lambda: (lambda s, c: s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime)(
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    if a.child == 'bare':
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing as mp
        import pydicom, pydicom.pixels  # noqa: F401  (inherited by the forked workers)
        files = json.loads(Path(a.files).read_text())
        c0, t = cpu(), time.perf_counter()
        chunks = [files[i:i + 16] for i in range(0, len(files), 16)]
        with ProcessPoolExecutor(a.workers, mp_context=mp.get_context('fork')) as ex: n = sum(ex.map(_bare_chunk, chunks))
        r = dict(seconds=time.perf_counter() - t, files=len(files), decoded=n)
    else:
        import torch  # noqa: F401  (the imports are not what is measured)
        import rwid_nb.data.index, rwid_nb.data.cohort, rwid_nb.data.dicom  # noqa: F401  (imported by `preprocess` when it runs)
        from rwid_nb.data.shards import preprocess
        import multiprocessing as mp
        c0, t = cpu(), time.perf_counter()
        res = preprocess(a.index, a.out, workers=a.workers, progress=False)
        for p in mp.active_children(): p.join()  # workers still exiting count too (time and CPU)
        r = dict(seconds=time.perf_counter() - t, items=res['indexed'], built=res['built'], failed=res['failed'], mib=res['bytes'] / 2**20)
    r['cpu_s'] = cpu() - c0
    print(json.dumps(r))


def measure(kind, a, **kw):
    cmd = [sys.executable, __file__, '--child', kind, '--workers', str(a.workers)] + [x for k, v in kw.items() for x in (f'--{k}', str(v))]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode: raise SystemExit(f"{kind} run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--studies', type=int, default=300)
    ap.add_argument('--seed', type=int, default=7)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--cache', default=None)
    ap.add_argument('--child', choices=['bare', 'preprocess'], help=argparse.SUPPRESS)
    ap.add_argument('--files', help=argparse.SUPPRESS)
    ap.add_argument('--index', help=argparse.SUPPRESS)
    ap.add_argument('--out', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return child(a)
    from rwid_nb.core import load_settings
    from rwid_nb.data.phantom import generate_cohort, read_cohort_summary, PHANTOM_VERSION
    from rwid_nb.data.index import index_dicom
    from rwid_nb.data.phi import AuditPolicy
    from rwid_nb.data.shards import plan_items
    base = (Path(a.cache) if a.cache else load_settings().cache_root)/'bench-preprocess'/f'phantom-{a.studies}-seed{a.seed}'
    if (s := read_cohort_summary(base/'cohort')) is None or s.get('generator_version') != PHANTOM_VERSION:  # (older generator: remake)
        print(f"generating a {a.studies}-study phantom cohort into {base} (once) ...", flush=True)
        generate_cohort(base/'cohort', a.studies, seed=a.seed, workers=2, progress=False, overwrite=True)
        shutil.rmtree(base/'index', ignore_errors=True)  # (the index of the old cohort)
    if not (base/'index'/'index.json').exists():
        index_dicom(base/'cohort'/'dicom', base/'index', workers=2, secret=SECRET, progress=False, policy=AuditPolicy(pixel_check='none'))
    items = plan_items(base/'index')
    root = Path(json.loads((base/'index'/'index.json').read_text())['root'])
    files = [str(root/p) for fs in items.files for p in fs]
    for f in files:
        with open(f, 'rb') as fh:
            while fh.read(1 << 20): pass
    tmp = Path(tempfile.mkdtemp(prefix='rwid-bench-pre-'))
    try:
        (tmp/'files.json').write_text(json.dumps(files))
        bare, pre, rerun = [], [], []
        for r in range(a.repeats):
            bare.append(measure('bare', a, files=tmp/'files.json'))
            pre.append(measure('preprocess', a, index=base/'index', out=tmp/f'shards{r}'))
            rerun.append(measure('preprocess', a, index=base/'index', out=tmp/f'shards{r}'))
        med = lambda rs, k='seconds': statistics.median(x[k] for x in rs)
        kinds = items.kind.value_counts().to_dict()
        print(f"machine: {os.cpu_count()} cores; cohort: {a.studies} studies, {len(items):,} items ({kinds}), {len(files):,} files; "
              f"workers: {a.workers}; {a.repeats} repeats, interleaved\n")
        print("| run | wall s (median) | items/s | time vs bare decode | CPU s (median) |")
        print("|---|---:|---:|---:|---:|")
        tb = med(bare)
        for name, rs in (('bare `dcmread(f).pixel_array` over the same files', bare),
                         ('`preprocess`, fresh shards folder', pre), ('`preprocess`, rerun (nothing to build)', rerun)):
            print(f"| {name} | {med(rs):.2f} | {len(items) / med(rs):,.1f} | {med(rs) / tb:.2f} | {med(rs, 'cpu_s'):.1f} |")
        ratio = med(pre) / tb
        paired = statistics.median(p['seconds'] / b['seconds'] for b, p in zip(bare, pre))
        print(f"\ntarget: preprocess within 1.5 x bare decode -> {ratio:.2f} ({'met' if ratio <= 1.5 else 'NOT met'}); "
              f"{pre[0]['items']:,} items, {pre[0]['mib']:.0f} MiB of shards, {pre[0]['failed']} failed\n"
              f"median of the ratios of back-to-back runs (steadier when others share the machine): {paired:.2f}; "
              f"CPU seconds: {med(pre, 'cpu_s') / med(bare, 'cpu_s'):.2f} x")
    finally: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
