"""Datasets and loaders over shards: determinism across worker processes, resume, replicas, torchrun, damaged shards."""
import json, os, shutil, subprocess, sys, textwrap, zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rwid_nb.data.shards import read_index, ShardError, PreprocessSettings
from rwid_nb.data.dataset import ImageReportDataset, ResumableSampler, make_loader, phantom_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A 28-study phantom cohort (every modality, no PHI) indexed, labelled, split and preprocessed into small shards."
    from rwid_nb.data.phantom import generate_cohort
    tmp = tmp_path_factory.mktemp('dataset')
    generate_cohort(tmp/'cohort', 28, seed=4, inject_phi=0.0, workers=2, progress=False)
    phantom_shards(tmp/'shards', tmp/'cohort', PreprocessSettings(size_2d=96, ct_size=(16, 48, 48), mr_size=(16, 48, 48)))
    return dict(shards=tmp/'shards', tmp=tmp)


def _run(ds, **kw):
    "Every batch of one pass: (index list, item keys, images, captions)."
    out = []
    for b in make_loader(ds, **{'batch_size': 3, 'workers': 2, **kw}):
        out.append((b['index'].tolist(), b['item_key'], b['image'], b['caption']))
    return out


def _same(r1, r2):
    assert [b[:2] for b in r1] == [b[:2] for b in r2]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(r1, r2))


def test_same_seed_epoch_same_batches_across_runs_and_workers(data):
    ds = ImageReportDataset(data['shards'], split=None, size=64, seed=7)
    r1, r2 = _run(ds, seed=3, epoch=1), _run(ds, seed=3, epoch=1)
    assert len(r1) == len(ds) // 3 and len(r1) >= 3
    _same(r1, r2)                                      # two loader runs, two worker processes each
    _same(r1, _run(ds, seed=3, epoch=1, workers=0))    # the main process (several threads) gives the same bits
    fresh = ImageReportDataset(data['shards'], split=None, size=64, seed=7)   # a new process would build a new one
    _same(r1, _run(fresh, seed=3, epoch=1))


def test_other_epoch_other_batches(data):
    ds = ImageReportDataset(data['shards'], split=None, size=64, seed=7)
    r1, r2 = _run(ds, seed=3, epoch=1), _run(ds, seed=3, epoch=2)
    assert [b[0] for b in r1] != [b[0] for b in r2]                   # another order
    im1 = {i: im for b in r1 for i, im in zip(b[0], b[2])}
    im2 = {i: im for b in r2 for i, im in zip(b[0], b[2])}
    common = set(im1) & set(im2)
    assert common and all(not torch.equal(im1[i], im2[i]) for i in common)   # another augmentation of the same item


def test_resume_yields_the_tail_of_the_epoch(data):
    ds = ImageReportDataset(data['shards'], split=None, size=64, seed=7)
    full = _run(ds, seed=5, epoch=4)
    for k in (1, 2):
        _same(_run(ds, seed=5, epoch=4, start=3*k), full[k:])
    s = ResumableSampler(len(ds), seed=5, epoch=4)
    s2 = ResumableSampler(len(ds)); s2.load_state_dict(s.state_dict(consumed=3))
    _same(_run(ds, seed=5, epoch=4, start=s2.start), full[1:])


def test_two_replicas_partition_the_epoch(data):
    ds = ImageReportDataset(data['shards'], split=None, size=64, seed=7)
    n = len(ds)
    seen = [[i for b in _run(ds, seed=2, num_replicas=2, rank=r, batch_size=1, drop_last=False) for i in b[0]] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == -(-n // 2)
    assert set(seen[0]) | set(seen[1]) == set(range(n))
    if n % 2 == 0: assert not set(seen[0]) & set(seen[1])
    kept = [[i for b in _run(ds, seed=2, num_replicas=2, rank=r, batch_size=1, drop_last=True) for i in b[0]] for r in (0, 1)]
    assert not set(kept[0]) & set(kept[1]) and len(kept[0]) == len(kept[1]) == n // 2


def test_no_augmentation_is_deterministic_and_seed_independent(data):
    a = ImageReportDataset(data['shards'], split=None, size=64, augment=False, seed=0)
    b = ImageReportDataset(data['shards'], split=None, size=64, augment=False, seed=99)
    b.set_epoch(5)
    for i in range(len(a)): assert torch.equal(a[i]['image'], b[i]['image'])
    _same(_run(a, seed=1, shuffle=False), _run(b, seed=1, shuffle=False, epoch=3))
    aug = ImageReportDataset(data['shards'], split=None, size=64, augment=True, seed=0)
    assert not torch.equal(a[0]['image'], aug[0]['image'])


def test_shapes_and_dtypes(data):
    d = data['shards']
    cases = [(dict(kind='2d', size=64), (3, 64, 64)), (dict(kind='2d', size=48, channels=1), (1, 48, 48)),
             (dict(kind='3d', size=(24, 32, 32)), (1, 24, 32, 32)), (dict(kind='2.5d', size=40), (3, 40, 40)),
             (dict(kind='2.5d', size=40, slices=5, augment=False), (5, 40, 40))]
    idx = read_index(d)
    for kw, shape in cases:
        ds = ImageReportDataset(d, split=None, **kw)
        assert len(ds) == int(idx.kind.eq('2d' if kw['kind'] == '2d' else '3d').sum())
        b = next(iter(make_loader(ds, 2, workers=0, drop_last=False)))
        assert tuple(b['image'].shape) == (2, *shape), kw
        assert b['image'].dtype == torch.float32 and b['labels'].dtype == torch.float32
        assert torch.isfinite(b['image']).all()
        assert isinstance(b['caption'], list) and all(isinstance(c, str) and c for c in b['caption'])
    # without normalisation, 2D values are windowed into [0, 1] (no noise without augmentation)
    x = ImageReportDataset(d, split=None, size=64, augment=False, normalize=False)[0]['image']
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.5


def test_modalities_and_splits_select(data):
    d, idx = data['shards'], read_index(data['shards'])
    ds = ImageReportDataset(d, split=None, kind='2.5d', modalities=['CT'], size=32)
    assert {ds[i]['modality'] for i in range(len(ds))} == {'CT'}
    assert len(ds) == int((idx.modality == 'CT').sum())
    for split in ('train', ['train', 'val']):
        want = idx[idx.kind.eq('2d') & idx.split.isin([split] if isinstance(split, str) else split)]
        if len(want): assert len(ImageReportDataset(d, split=split, size=32)) == len(want)
    with pytest.raises(ValueError, match='no 2d items'): ImageReportDataset(d, split='nonexistent')


def test_labels_nan_where_not_mentioned(data):
    ix = read_index(data['shards']).set_index('item_key')
    for kind in ('2d', '3d'):
        ds = ImageReportDataset(data['shards'], split=None, kind=kind, size=32 if kind == '2d' else (8, 16, 16), augment=False)
        assert 'no_finding' in ds.label_names and 'cardiomegaly' in ds.label_names
        for i in range(len(ds)):
            it = ds[i]
            want = ix.loc[it['item_key'], ds.label_names].astype('Float32').to_numpy(dtype=np.float32, na_value=np.nan)
            np.testing.assert_array_equal(it['labels'].numpy(), want)
        assert np.isnan(np.stack([ds[i]['labels'].numpy() for i in range(len(ds))])).any()


def test_loader_leaves_global_rng_alone(data):
    ds = ImageReportDataset(data['shards'], split=None, size=32)
    torch.manual_seed(0); want = torch.rand(3)
    torch.manual_seed(0)
    for _ in make_loader(ds, 4, workers=0): pass
    assert torch.equal(torch.rand(3), want)


def test_corrupt_shard_raises_shard_error_through_workers(data, tmp_path):
    d = tmp_path/'shards'
    shutil.copytree(data['shards'], d)
    idx = read_index(d)
    r = idx[idx.kind == '2d'].iloc[0]
    raw = bytearray((d/r.shard).read_bytes())
    raw[int(r.offset) + int(r.nbytes) // 2] ^= 0xFF
    (d/r.shard).write_bytes(bytes(raw))
    assert zlib.crc32(bytes(raw[int(r.offset):int(r.offset) + int(r.nbytes)])) != int(r.crc32)
    ds = ImageReportDataset(d, split=None, size=32, augment=False)
    with pytest.raises(ShardError, match=Path(r.shard).name):
        for _ in make_loader(ds, 2, workers=2, shuffle=False, drop_last=False): pass


TORCHRUN_SCRIPT = '''
import json, os, sys, torch.distributed as dist
from rwid_nb.data.dataset import ImageReportDataset, make_loader
dist.init_process_group('gloo')
ds = ImageReportDataset(sys.argv[1], split=None, size=96, augment=False)
dl = make_loader(ds, 2, workers=0, seed=9, epoch=1, drop_last=False)
seen = [i for b in dl for i in b['index'].tolist()]
out = dict(rank=dist.get_rank(), replicas=dl.sampler.num_replicas, seen=seen, n=len(ds))
open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(out))
dist.destroy_process_group()
'''


def test_torchrun_ranks_partition_the_epoch(data, tmp_path):
    "Under torchrun, make_loader takes the world size and rank from the process group."
    (tmp_path/'run.py').write_text(TORCHRUN_SCRIPT)
    torchrun = Path(sys.executable).with_name('torchrun')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([str(torchrun), '--standalone', '--nproc-per-node', '2', str(tmp_path/'run.py'), str(data['shards']),
                        str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    res = [json.loads((tmp_path/f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [r['replicas'] for r in res] == [2, 2] and [r['rank'] for r in res] == [0, 1]
    n = res[0]['n']
    assert len(res[0]['seen']) == len(res[1]['seen']) == -(-n // 2)
    assert set(res[0]['seen']) | set(res[1]['seen']) == set(range(n))
    # the same split as an explicit two-replica loader in this process
    ds = ImageReportDataset(data['shards'], split=None, size=96, augment=False)
    for r in (0, 1):
        assert res[r]['seen'] == [i for b in make_loader(ds, 2, workers=0, seed=9, epoch=1, drop_last=False, num_replicas=2, rank=r)
                                  for i in b['index'].tolist()]
