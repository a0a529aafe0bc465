"""Preprocessed shards (rwid_nb.data.shards): built once from an audited index, rebuilt only where a setting or a file
changed, restartable after kill -9, shardable, and a damaged shard is an error naming it, never wrong pixels."""
import io, os, json, signal, shutil, subprocess, sys, time, contextlib
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

from rwid_nb.cli import main
from rwid_nb.data.index import index_dicom
from rwid_nb.data.reports import write_labels
from rwid_nb.data.cohort import CohortDefinition, build_cohort, write_split
from rwid_nb.data.shards import (preprocess, read_index, ShardReader, ShardError, PreprocessSettings, plan_items)

SECRET = b'test-shards-secret-' + b'z' * 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def indexed(tmp_path_factory):
    "A 30-study phantom with PHI in some studies: indexed and audited, reports labelled, patients split."
    from rwid_nb.data.phantom import generate_cohort
    d = tmp_path_factory.mktemp('shards')
    generate_cohort(d/'c', 30, seed=8, inject_phi=0.2, workers=2, progress=False)
    index_dicom(d/'c'/'dicom', d/'idx', workers=2, reports=d/'c'/'reports.csv', secret=SECRET, progress=False)
    write_labels(d/'c'/'reports.csv', d/'idx'/'labels.parquet')
    write_split(build_cohort(CohortDefinition('all', 1, split={'fractions': {'train': 0.7, 'val': 0.1, 'test': 0.2}, 'seed': 1}),
                             d/'idx'), d/'idx'/'split_all.v1.parquet')
    return d


@pytest.fixture(scope='module')
def built(indexed):
    out = indexed/'shards'
    res = preprocess(indexed/'idx', out, workers=2, progress=False, items_per_shard=8)
    return out, res


def test_every_gated_item_is_built_with_split_caption_labels(indexed, built):
    out, res = built
    ix = read_index(out)
    studies = pd.read_parquet(indexed/'idx'/'studies.parquet')
    clean = set(studies.study_key[studies.audit_status == 'clean'])
    assert res['failed'] == 0 and res['pending'] == 0 and len(ix) == res['items']
    assert set(ix.study_key) == clean  # flagged studies are not items; every clean study is
    assert ix.split.isin(['train', 'val', 'test', 'ood']).all() and ix.caption.str.len().gt(20).all()
    assert {'cardiomegaly', 'no_finding', 'lung_nodule'} <= set(ix.columns)
    assert set(ix.kind) == {'2d', '3d'} and (ix.kind == '3d').eq(ix.modality.isin(['CT', 'MR'])).all()
    r = ShardReader(out)
    for k in range(len(ix)):
        a = r.read(k)
        assert a.dtype == np.float32 and list(a.shape) == list(ix['shape'][k]) and np.isfinite(a).all()


def test_2d_item_matches_its_source_pixels(indexed, built):
    "A radiograph item is the source image (read_instance) resized: same value range, same mean within a few percent."
    from rwid_nb.data.dicom import read_instance
    out, _ = built
    ix = read_index(out)
    items = plan_items(indexed/'idx').set_index('item_key')
    k = int(np.flatnonzero(ix.modality.isin(['CR', 'DX']))[0])
    src = read_instance(Path(json.loads((indexed/'idx'/'index.json').read_text())['root'])/items.loc[ix.item_key[k], 'files'][0]).pixels
    a = ShardReader(out).read(k)[0]
    assert max(a.shape) == 256 and a.max() <= src.max() + 1 and a.min() >= src.min() - 1
    inner = a[a > a.min()]  # the padding is at the minimum
    assert abs(inner.mean() - src.mean()) < 0.05 * (src.max() - src.min())


def test_setting_change_rebuilds_only_what_depends_on_it(indexed, built, tmp_path):
    out = tmp_path/'shards'
    shutil.copytree(built[0], out)
    before = read_index(out).set_index('item_key')
    res = preprocess(indexed/'idx', out, PreprocessSettings(mr_size=(16, 128, 128)), workers=2, progress=False)
    after = read_index(out).set_index('item_key')
    changed = set(after.index[after.cache_key != before.cache_key.reindex(after.index)])
    assert changed == set(before.index[before.modality == 'MR']) and res['built'] == len(changed) > 0
    cur = set(after.cache_key)
    assert all(set(pd.read_parquet(f).cache_key) & cur for f in (out/'shards').glob('*.parquet'))  # no shard is all stale
    r = ShardReader(out)
    for k in np.flatnonzero(after.modality == 'MR'): assert r.read(int(k)).shape == (1, 16, 128, 128)
    # a changed source file rebuilds its item only
    items = plan_items(indexed/'idx').set_index('item_key')
    root = Path(json.loads((indexed/'idx'/'index.json').read_text())['root'])
    key = after.index[after.modality.isin(['CR', 'DX'])][0]
    f = root/items.loc[key, 'files'][0]
    data = f.read_bytes(); time.sleep(0.01)
    try:
        f.write_bytes(data[:-2] + bytes([data[-2] ^ 1, data[-1]]))  # one pixel byte changed
        res2 = preprocess(indexed/'idx', out, PreprocessSettings(mr_size=(16, 128, 128)), workers=1, progress=False)
        assert res2['built'] == 1 and read_index(out).set_index('item_key').cache_key[key] != after.cache_key[key]
    finally: f.write_bytes(data)


def test_touched_files_and_a_lost_hash_cache_rebuild_nothing(indexed, built, tmp_path):
    "Workers hash new or changed files themselves: a touched file (same bytes) or no hash cache at all gives the same keys."
    out = tmp_path/'shards'
    shutil.copytree(built[0], out)
    before = read_index(out).set_index('item_key')
    root = Path(json.loads((indexed/'idx'/'index.json').read_text())['root'])
    items = plan_items(indexed/'idx').set_index('item_key')
    touched = [root/items.files[k][0] for k in (before.index[before.kind == '3d'][0], before.index[before.kind == '2d'][0])]
    for f in touched: os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    res = preprocess(indexed/'idx', out, workers=2, progress=False)
    assert (res['built'], res['reused'], res['pending']) == (0, len(before), 0)
    hashes = pd.read_parquet(out/'.filehash-0-of-1.parquet').set_index('path')
    assert all(hashes.mtime_ns[str(f.relative_to(root))] == f.stat().st_mtime_ns for f in touched)  # the cache knows them now
    (out/'.filehash-0-of-1.parquet').unlink()
    res = preprocess(indexed/'idx', out, workers=1, progress=False)
    assert (res['built'], res['reused'], res['pending']) == (0, len(before), 0)
    after = read_index(out).set_index('item_key')
    assert (after.cache_key == before.cache_key[after.index]).all() and len(after) == len(before)


def test_corrupt_or_truncated_shard_is_an_error_naming_it(built, tmp_path):
    out = tmp_path/'shards'
    shutil.copytree(built[0], out)
    ix = read_index(out)
    shard = out/ix.shard[0]
    raw = bytearray(shard.read_bytes()); raw[int(ix.offset[0]) + 3] ^= 0x40; shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=ix.shard[0].split('/')[-1]): ShardReader(out).read(0)
    k = int(np.flatnonzero(ix.shard == ix.shard[0])[-1])
    shard.write_bytes(bytes(raw[:int(ix.offset[k]) + 10]))
    with pytest.raises(ShardError, match='truncated'): ShardReader(out).read(k)
    (out/ix.shard[0]).unlink()
    with pytest.raises(ShardError, match='cannot be opened'): ShardReader(out).read(0)


def test_shards_of_a_split_run_equal_one_run(indexed, built, tmp_path):
    out = tmp_path/'shards'
    a = preprocess(indexed/'idx', out, workers=1, shard='0/2', progress=False)
    assert a['pending'] > 0
    b = preprocess(indexed/'idx', out, workers=1, shard='1/2', progress=False)
    assert b['pending'] == 0
    x, y = read_index(out).set_index('item_key'), read_index(built[0]).set_index('item_key')
    assert set(x.index) == set(y.index) and (x.cache_key == y.cache_key[x.index]).all()


def test_kill_and_rerun_equals_uninterrupted(indexed, built, tmp_path):
    out = tmp_path/'shards'
    code = ("import sys; from rwid_nb.data.shards import preprocess; "
            f"preprocess({str(indexed/'idx')!r}, {str(out)!r}, workers=2, progress=False, items_per_shard=2)")
    p = subprocess.Popen([sys.executable, '-c', code], start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 120 and len(list((out/'shards').glob('*.parquet'))) < 3: time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (out/'index.parquet').exists() or len(read_index(out)) < len(read_index(built[0]))
    res = preprocess(indexed/'idx', out, workers=2, progress=False)
    assert res['reused'] > 0
    x, y = read_index(out).set_index('item_key'), read_index(built[0]).set_index('item_key')
    assert set(x.index) == set(y.index) and (x.cache_key == y.cache_key[x.index]).all()
    r1, r2 = ShardReader(out, x.reset_index()), ShardReader(built[0], y.loc[x.index].reset_index())
    for k in range(0, len(x), 5): np.testing.assert_array_equal(r1.read(k), r2.read(k))


def test_rwid_preprocess_cli(indexed, tmp_path):
    out = tmp_path/'shards'
    with contextlib.redirect_stdout(io.StringIO()) as o:
        rc = main(['preprocess', str(indexed/'idx'), '--out', str(out), '--workers', '2', '--quiet', '--size-2d', '128'])
    assert rc == 0 and 'preprocessing:' in o.getvalue()
    ix = read_index(out)
    assert ix.loc[ix.kind == '2d', 'shape'].map(lambda s: max(s[1:])).eq(128).all()
    assert {'study_key', 'split', 'cache_key'} <= set(ix.columns)
    with contextlib.redirect_stderr(io.StringIO()) as e:
        assert main(['preprocess', str(tmp_path/'nowhere'), '--out', str(out)]) == 2
    assert 'nowhere' in e.getvalue()
