"""The indexer over a real mess: pydicom's, pydicom-data's and deid-data's files plus a damaged, PHI-leaking phantom,
linked into one delivery folder. Accounting, corruption reasons, kill -9 and resume, incremental runs, shards,
hostile files and PHI-freedom of every Parquet file written."""
import os, re, sys, json, time, shutil, signal, subprocess
from pathlib import Path
import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rwid_nb.core import patient_token
from rwid_nb.data.index import (index_dicom, query, format_accounting,
                                QUARANTINE_REASONS, INSTANCE_COLUMNS, STUDY_COLUMNS, SERIES_COLUMNS, QUARANTINE_COLUMNS)
from corpora import corpus_dirs

SECRET = b'test-index-secret-' + b'x' * 20
TABLES = {'instances': 'path', 'quarantine': 'path', 'series': 'series_uid', 'studies': 'study_key'}
# truncated -> truncated, or unreadable_header when the cut lands in the header and pydicom gives up before the end
EXPECTED = {'truncated': {'truncated', 'unreadable_header'}, 'not_dicom': {'not_dicom'},
            'no_pixel_data': {'no_pixel_data'}, 'wrong_dimensions': {'inconsistent_geometry'}}


def walk_count(root):
    "Files under root, counted independently of the indexer (links followed)."
    return sum(len(files) for _, _, files in os.walk(root, followlinks=True))


def read_table(out, table):
    return query(out, f'SELECT * FROM {table} ORDER BY {TABLES[table]}')


def assert_same_manifests(a, b):
    for t in TABLES:
        x, y = read_table(a, t), read_table(b, t)
        assert list(x.columns) == list(y.columns), t
        pd.testing.assert_frame_equal(x, y, check_dtype=False, obj=t)


@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
    "About 1,400 files: 200 studies, 10% of files damaged, PHI leaked into 30% of studies."
    from rwid_nb.data.phantom import generate_cohort
    out = tmp_path_factory.mktemp('idx-phantom')/'cohort'
    generate_cohort(out, 200, seed=21, corrupt=0.1, inject_phi=0.3, workers=2, progress=False)
    return out


@pytest.fixture(scope='module')
def delivery(phantom, tmp_path_factory):
    "One root holding the three real corpora and the phantom's DICOM tree, through links."
    root = tmp_path_factory.mktemp('idx-delivery')/'root'
    (root/'corpora').mkdir(parents=True)
    for name, d in corpus_dirs().items(): os.symlink(d, root/'corpora'/name)
    os.symlink(phantom/'dicom', root/'phantom')
    return root


@pytest.fixture(scope='module')
def full(delivery, phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp('idx-full')/'manifests'
    res = index_dicom(delivery, out, workers=2, reports=phantom/'reports.csv', secret=SECRET, progress=False, chunk_size=128)
    return out, res


def test_every_file_accounted(delivery, full):
    out, res = full
    n = walk_count(delivery)
    assert n > 1500
    assert res['files_seen'] == n == res['indexed'] + sum(res['quarantined'].values())
    inst, quar = read_table(out, 'instances'), read_table(out, 'quarantine')
    assert len(inst) == res['indexed'] and len(quar) == sum(res['quarantined'].values())
    paths = pd.concat([inst.path, quar.path])
    assert paths.is_unique and len(paths) == n
    assert set(quar.reason) <= set(QUARANTINE_REASONS)
    assert quar.groupby('reason').size().to_dict() == res['quarantined']
    assert list(inst.columns) == INSTANCE_COLUMNS and list(quar.columns) == QUARANTINE_COLUMNS
    assert list(read_table(out, 'series').columns) == SERIES_COLUMNS
    assert list(read_table(out, 'studies').columns) == STUDY_COLUMNS
    assert json.loads((out/'index.json').read_text())['files_seen'] == n
    text = format_accounting(res)
    assert f"{n:,}" in text and 'duplicate_instance' in text


def test_corruptions_get_their_reason(phantom, full):
    out, _ = full
    bad = pd.read_csv(phantom/'corruptions.csv')
    assert set(bad.kind) == set(EXPECTED)
    bad['path'] = 'phantom/' + bad.file.str.removeprefix('dicom/')
    quar = read_table(out, 'quarantine')
    m = bad.merge(quar, on='path', how='left')
    wrong = m[[r not in EXPECTED[k] for k, r in zip(m.kind, m.reason)]]
    assert wrong.empty, wrong[['path', 'kind', 'reason', 'detail']].to_string()
    # and nothing else of the phantom is quarantined: undamaged files all index
    assert set(quar.path[quar.path.str.startswith('phantom/')]) == set(bad.path)


def test_real_corpora_reasons(full):
    "Known files of pydicom's corpus: each reason the corpora can show occurs, on the file that shows it."
    out, _ = full
    q = read_table(out, 'quarantine').set_index('path')
    base = 'corpora/pydicom/'
    assert q.loc[base + 'MR_truncated.dcm', 'reason'] == 'truncated'
    assert q.loc[base + 'rtplan_truncated.dcm', 'reason'] == 'truncated'
    assert q.loc[base + 'rtplan.dcm', 'reason'] == 'no_pixel_data'
    assert q.loc[base + 'zipMR.gz', 'reason'] == 'not_dicom'
    assert q.loc[base + 'nested_priv_SQ.dcm', 'reason'] == 'missing_uid'
    assert q.loc[base + 'badVR.dcm', 'reason'] == 'inconsistent_geometry'
    assert q.loc['corpora/pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm', 'reason'] == 'truncated'
    dup = q[q.reason == 'duplicate_instance']
    assert len(dup) > 10
    inst = read_table(out, 'instances').set_index('path')
    for p, detail in dup.detail.items():  # the kept copy sorts first and is indexed
        kept = detail.removeprefix('same SOPInstanceUID as ')
        assert kept < p and inst.loc[kept, 'instance_uid'] is not None
    assert inst.instance_uid.is_unique


def test_hostile_files_never_raise(tmp_path):
    root = tmp_path/'root'; root.mkdir()
    ct = (Path(corpus_dirs()['pydicom'])/'CT_small.dcm').read_bytes()
    (root/'empty').write_bytes(b'')
    (root/'one_byte').write_bytes(b'\x00')
    (root/'preamble_only.dcm').write_bytes(bytes(128) + b'DICM')
    (root/'preamble_garbage.dcm').write_bytes(bytes(128) + b'DICM' + os.urandom(3000))
    (root/'fake_element').write_bytes(b'\x08\x00\x05\x00CS\xff\xff' + os.urandom(500))
    (root/'cut_at_132.dcm').write_bytes(ct[:140])
    (root/'cut_mid_tag.dcm').write_bytes(ct[:ct.index(b'\x10\x00\x10\x00') + 3])  # inside (0010,0010)'s header
    import pydicom
    odd = pydicom.dcmread(Path(corpus_dirs()['pydicom'])/'SC_rgb_jpeg_dcmtk.dcm')
    odd.file_meta.TransferSyntaxUID = '1.2.826.0.1.3680043.9.9999.1'  # a private syntax nobody decodes
    odd.save_as(root/'private_syntax.dcm')
    os.symlink(root/'does-not-exist', root/'broken_link')
    os.mkfifo(root/'a_fifo')
    out = root/'manifests'  # inside the delivery: skipped by the walk
    res = index_dicom(root, out, workers=1, secret=SECRET, progress=False)
    assert res['files_seen'] == 10 and res['indexed'] == 0
    assert index_dicom(root, out, workers=1, secret=SECRET, progress=False)['files_seen'] == 10
    q = read_table(out, 'quarantine').set_index('path').reason.to_dict()
    assert q['broken_link'] == 'unreadable_file' and q['a_fifo'] == 'unreadable_file'
    assert q['empty'] == q['one_byte'] == 'not_dicom'
    assert q['cut_mid_tag.dcm'] == 'truncated'
    assert q['private_syntax.dcm'] == 'undecodable_transfer_syntax'
    assert set(q.values()) <= set(QUARANTINE_REASONS)
    empty = tmp_path/'empty'; empty.mkdir()
    r = index_dicom(empty, tmp_path/'out-empty', workers=2, secret=SECRET, progress=False)
    assert (r['files_seen'], r['studies']) == (0, 0) and query(tmp_path/'out-empty', 'SELECT * FROM studies').empty


def test_kill_and_resume_equals_uninterrupted(delivery, phantom, full, tmp_path):
    out = tmp_path/'killed'
    code = ("import sys; from rwid_nb.data.index import index_dicom; "
            f"index_dicom({str(delivery)!r}, {str(out)!r}, workers=2, reports={str(phantom/'reports.csv')!r}, "
            f"secret={SECRET!r}, progress=False, chunk_size=16)")
    p = subprocess.Popen([sys.executable, '-c', code], start_new_session=True)
    chunks = out/'.parts'/'chunks-0-of-1'
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if chunks.is_dir() and len(list(chunks.glob('part-*.parquet'))) >= 4: break
            time.sleep(0.01)
        assert p.poll() is None, 'the indexer finished before it could be killed'
        os.killpg(p.pid, signal.SIGKILL)  # the main process and its workers
        p.wait(timeout=60)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    assert not (out/'instances.parquet').exists()  # killed before the manifests
    n_parts = len(list(chunks.glob('part-*.parquet')))
    res = index_dicom(delivery, out, workers=2, reports=phantom/'reports.csv', secret=SECRET, progress=False, chunk_size=16)
    assert res['reused'] >= 16 * n_parts and res['reused'] + res['scanned'] == res['files_seen']
    assert_same_manifests(out, full[0])
    assert not list(out.rglob('*.tmp'))


def test_incremental_indexes_only_new_files(tmp_path, phantom):
    src = corpus_dirs()['pydicom']
    root = tmp_path/'root'; shutil.copytree(src, root/'first')
    out = tmp_path/'out'
    r1 = index_dicom(root, out, workers=2, secret=SECRET, progress=False, chunk_size=32)
    assert r1['scanned'] == r1['files_seen'] == walk_count(root)
    assert index_dicom(root, out, workers=2, secret=SECRET, progress=False)['scanned'] == 0
    new = sorted((phantom/'dicom'/'S01').rglob('*'))[:40]
    new = [f for f in new if f.is_file()]
    for k, f in enumerate(new): (root/'late').mkdir(exist_ok=True); shutil.copy(f, root/'late'/f'{k:03d}_{f.name}')
    r2 = index_dicom(root, out, workers=2, secret=SECRET, progress=False, chunk_size=32)
    assert r2['scanned'] == len(new) and r2['files_seen'] == r1['files_seen'] + len(new)
    fresh = tmp_path/'fresh'
    index_dicom(root, fresh, workers=1, secret=SECRET, progress=False)
    assert_same_manifests(out, fresh)
    # a changed file is rescanned, a deleted file's row goes
    victim = root/'first'/'CT_small.dcm'
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    (root/'late'/f'000_{new[0].name}').unlink()
    r3 = index_dicom(root, out, workers=2, secret=SECRET, progress=False)
    assert r3['scanned'] == 1 and r3['files_seen'] == r2['files_seen'] - 1
    assert query(out, "SELECT count(*) AS n FROM instances WHERE path LIKE 'late/000_%'").n[0] == 0
    # a new secret makes new tokens: nothing cached under the old one is reused
    assert index_dicom(root, out, workers=2, secret=b'another-secret' * 3, progress=False)['reused'] == 0


def test_shards_union_equals_unsharded(delivery, phantom, full, tmp_path):
    out = tmp_path/'sharded'
    kw = dict(workers=2, reports=phantom/'reports.csv', secret=SECRET, progress=False, chunk_size=128)
    r0 = index_dicom(delivery, out, shard='0/2', **kw)
    assert not r0['manifests_written'] and r0['waiting_for_shards'] == [1]
    assert r0['files_seen'] == r0['indexed'] + sum(r0['quarantined'].values())
    r1 = index_dicom(delivery, out, shard=(1, 2), **kw)
    assert r1['manifests_written'] and r0['shard_files'] + r1['shard_files'] == full[1]['files_seen']
    names = sorted(p.name for p in out.glob('*.parquet'))
    assert 'instances.parquet' not in names and 'instances-0-of-2.parquet' in names and 'studies-1-of-2.parquet' in names
    assert_same_manifests(out, full[0])
    # each shard's instance file holds exactly the files of that shard
    for i, r in ((0, r0), (1, r1)):
        n = len(pq.read_table(out/f'instances-{i}-of-2.parquet')) + len(pq.read_table(out/f'quarantine-{i}-of-2.parquet'))
        assert n == r['shard_files']


def _strings(v):
    if v is None: return []
    if isinstance(v, (list, tuple)): return [s for x in v for s in _strings(x)]
    return [str(v)]


def test_no_injected_phi_in_any_parquet(phantom, full):
    out, _ = full
    phi = pd.read_csv(phantom/'phi_injections.csv', dtype=str)
    assert len(phi) > 50
    values = set(phi.value.dropna().str.strip())
    numeric = {v for v in values if v.isdigit()}
    texts = {v.upper() for v in values - numeric if len(v) >= 4}
    files = list(out.rglob('*.parquet'))
    assert any(f.parent.name == '.parts' for f in files)  # the part files are checked too
    cells = 0
    for f in files:
        for col in pq.read_table(f).to_pylist():
            for s in (s for v in col.values() for s in _strings(v)):
                cells += 1
                tokens = set(re.split(r'[^0-9A-Za-z]+', s))
                assert not numeric & tokens, f'{f.name}: an injected number appears'
                su = s.upper()
                assert not any(t in su for t in texts), f'{f.name}: an injected text value appears'
    assert cells > 10_000
    summary = (out/'index.json').read_text().upper()
    assert not any(t in summary for t in texts | numeric)


def test_patient_key_is_a_token(phantom, full):
    out, _ = full
    gt = pd.read_csv(phantom/'ground_truth.csv')
    st = read_table(out, 'studies')
    ph = st[st.site_id.str.fullmatch(r'S0\d')].merge(gt[['study_key', 'patient_key']], on='study_key', suffixes=('', '_gt'))
    assert len(ph) > 100
    for key, pid in zip(ph.patient_key, ph.patient_key_gt):
        assert pid not in key and key == patient_token(pid, SECRET)
    assert ph.groupby('patient_key_gt').patient_key.nunique().max() == 1
    inst = read_table(out, 'instances')
    assert not inst.patient_key.str.contains('|'.join(gt.patient_key.unique())).any()


def test_reports_linked_by_accession(phantom, full):
    out, res = full
    reports = pd.read_csv(phantom/'reports.csv')
    st = read_table(out, 'studies')
    linked = st[st.report_available]
    assert set(linked.report_matched_by) == {'AccessionNumber'}
    assert set(linked.study_key) == set(reports.study_key) & set(st.study_key)
    assert res['reports_linked'] == len(linked)
    assert res['reports_unmatched'] == len(set(reports.study_key) - set(st.study_key))
    inst = read_table(out, 'instances')
    assert inst.groupby('study_key').report_available.first().sum() == len(linked)


def test_reports_linked_by_folder_and_study_uid(tmp_path):
    "Report keys that are neither AccessionNumber nor study key: a study folder's name, or the StudyInstanceUID."
    import pydicom
    src = Path(corpus_dirs()['pydicom'])
    root = tmp_path/'root'
    for folder, name in (('EXAM01', 'CT_small.dcm'), ('EXAM02', 'MR_small.dcm'), ('EXAM03', 'JPEG2000.dcm')):
        (root/'siteA'/folder/'1').mkdir(parents=True); shutil.copy(src/name, root/'siteA'/folder/'1'/name)
    uid3 = str(pydicom.dcmread(src/'JPEG2000.dcm', stop_before_pixels=True).StudyInstanceUID)
    txt = tmp_path/'reports'; txt.mkdir()
    for key in ('EXAM01', 'EXAM02', 'siteA', 'NOT-A-STUDY', uid3):
        (txt/f'{key}.txt').write_text('FINDINGS: unremarkable.')
    (txt/'EXAM09.txt').write_text('   ')  # empty reports are not reports
    out = tmp_path/'out'
    res = index_dicom(root, out, workers=1, reports=txt, secret=SECRET, progress=False)
    links = query(out, 'SELECT s.study_key, l.report_key, l.matched_by FROM report_links l JOIN studies s USING (study_key)')
    by = dict(zip(links.report_key, links.matched_by))
    assert by == {'EXAM01': 'folder', 'EXAM02': 'folder', uid3: 'StudyInstanceUID'}
    # 'siteA' holds three studies, so it links none of them; 'NOT-A-STUDY' matches nothing
    assert res['reports_linked'] == 3 and res['reports_unmatched'] == 2
    assert query(out, 'SELECT count(*) AS n FROM studies WHERE report_available').n[0] == 3


TIGHT, MEM = '48MB', "SELECT current_setting('memory_limit')"


def test_tight_memory_limit_gives_the_same_manifests(phantom, tmp_path, monkeypatch):
    "Under a tight DuckDB memory limit, sorting a few rows at a time, the manifests (and a rerun's) equal a default run's."
    # (the damaged, PHI-leaking phantom of this file: duplicates, quarantine, findings and reports all take part)
    import rwid_nb.data.index as ix
    kw = dict(workers=2, reports=phantom/'reports.csv', secret=SECRET, progress=False, chunk_size=64)
    ref = index_dicom(phantom/'dicom', tmp_path/'default', **kw)
    monkeypatch.setattr(ix, 'DUCKDB_MEMORY_LIMIT', TIGHT)
    monkeypatch.setattr(ix, 'SORT_ROWS', 97)  # every table written in many key ranges
    con, plain = ix._connect(tmp_path, 2), duckdb.connect(config={'memory_limit': TIGHT})
    assert con.execute(MEM).fetchall() == plain.execute(MEM).fetchall() != duckdb.connect().execute(MEM).fetchall()
    con.close(); plain.close()
    out = tmp_path/'tight'
    res = index_dicom(phantom/'dicom', out, **kw)
    assert res['files_seen'] == ref['files_seen'] > 500 and res['audit'] == ref['audit']
    assert_same_manifests(out, tmp_path/'default')
    assert pq.ParquetFile(out/'instances.parquet').metadata.num_row_groups >= res['indexed'] // 97
    # the first run's scan file gathers the 64-file parts into row groups of at least SORT_ROWS records (a row group per
    # part made the writer's metadata grow with the delivery)
    scan = pq.ParquetFile(out/'.parts'/'scan-0-of-1.parquet').metadata
    assert scan.num_rows == res['files_seen'] and scan.num_row_groups <= res['files_seen'] // 97 + 1
    # the manifest step's working database is gone; a killed run's (here: junk) is replaced, not opened
    work = out/'.parts'/'manifests.duckdb'
    assert not work.exists()
    work.write_bytes(b'left by a killed run'); work.with_name(work.name + '.wal').write_bytes(b'junk')
    # a rerun finds nothing new and compacts the records again, through the same ranged writer: still sorted, same tables
    again = index_dicom(phantom/'dicom', out, **kw)
    assert not work.exists() and not work.with_name(work.name + '.wal').exists()
    assert again['scanned'] == 0 and again['reused'] == ref['files_seen']
    paths = pq.read_table(out/'.parts'/'scan-0-of-1.parquet', columns=['path'])['path'].to_pylist()
    assert paths == sorted(paths) and len(paths) == ref['files_seen']
    assert_same_manifests(out, tmp_path/'default')
