"""The phantom cohort generator: valid DICOM, coverage of syntaxes and photometrics, reports that agree with the
ground truth, determinism, and PHI / damage that is really there and really listed."""
import re, json
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import uid as U
from pydicom.errors import InvalidDicomError

from rwid_nb.data.phantom import (generate_cohort, cohort_digest, SITES, TS, ALL_FINDINGS, PRIVATE_CREATOR,
                                  CORRUPTION_KINDS, PHI_KINDS)
from conftest import COHORT_ARGS


def _files(root):
    return sorted(p for p in (root/'dicom').rglob('*') if p.is_file())


def test_layout_and_counts(cohort, tables):
    gt = tables['gt']
    assert len(gt) == COHORT_ARGS['n_studies'] and gt.study_key.is_unique
    assert sorted(p.name for p in cohort.iterdir()) == ['cohort.json', 'corruptions.csv', 'dicom', 'ground_truth.csv',
                                                        'phi_injections.csv', 'reports.csv', 'sites.csv']
    assert len(_files(cohort)) == gt.n_files.sum()
    # delivery layout: dicom/<site>/<patient>/<study>/<series>/<file>
    for f in _files(cohort):
        site, patient, study = f.relative_to(cohort/'dicom').parts[:3]
        assert patient.startswith(site + '-P') and study.startswith(patient + '-S')
    assert set(gt.site_id) == set(SITES)
    assert gt.continent.nunique() >= 4
    assert set(gt.modality) == {'CR', 'DX', 'CT', 'MR', 'US'}
    assert (gt.groupby('patient_key').size() > 1).any(), 'no longitudinal patients'
    assert list(tables['reports'].columns) == ['study_key', 'report_text']
    assert set(tables['reports'].study_key) == set(gt.study_key)
    summary = json.loads((cohort/'cohort.json').read_text())
    assert summary['n_files'] == gt.n_files.sum() and summary['n_studies'] == len(gt)


def test_every_undamaged_file_reads_and_decodes(cohort, tables):
    damaged = set(tables['bad'].file)
    seen_ts, seen_pi = set(), set()
    n = 0
    for f in _files(cohort):
        rel = f.relative_to(cohort).as_posix()
        if rel in damaged: continue
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
        assert arr.size > 0 and np.isfinite(arr.astype(float)).all()
        frames = int(getattr(ds, 'NumberOfFrames', 1) or 1)
        shape = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
        assert arr.shape[:len(shape)] == shape, rel
        seen_ts.add(ds.file_meta.TransferSyntaxUID); seen_pi.add(ds.PhotometricInterpretation)
        n += 1
    assert n > 0
    assert {U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.RLELossless, U.JPEGLSLossless,
            U.JPEG2000Lossless, U.JPEGBaseline8Bit} <= seen_ts
    assert {'MONOCHROME1', 'MONOCHROME2', 'RGB', 'YBR_FULL_422'} <= seen_pi


def test_headers_follow_the_site_profile_and_annex_e(cohort, tables):
    gt = tables['gt'].set_index('study_key')
    damaged = set(tables['bad'].file)
    leaked = set(tables['gt'].loc[tables['gt'].phi_injected == 1, 'study_key'])
    for f in _files(cohort)[::3]:
        rel = f.relative_to(cohort).as_posix()
        if rel in damaged: continue
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        row = gt.loc[ds.AccessionNumber]
        site = SITES[row.site_id]
        prof = {'CR': site.cxr, 'DX': site.cxr, 'CT': site.ct, 'MR': site.mr, 'US': site.us}[ds.Modality]
        assert ds.file_meta.TransferSyntaxUID == TS[prof['ts']]
        assert (ds.Manufacturer, ds.ManufacturerModelName) == site.vendors[ds.Modality]
        assert ds.PatientIdentityRemoved == 'YES'
        assert '113100' in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert ds.PatientID == row.patient_key and ds.ClinicalTrialSiteID == row.site_id
        if ds.AccessionNumber not in leaked:
            assert str(ds.PatientName) == '' and ds.PatientBirthDate == ''
            assert 'OtherPatientIDsSequence' not in ds and 'RequestAttributesSequence' not in ds
            assert not any(el.tag.is_private for el in ds)
        if ds.Modality in ('CR', 'DX'):
            assert ds.PhotometricInterpretation == site.cxr['photometric'] and ds.BitsStored == site.cxr['bits']
            assert ds.PresentationLUTShape == ('INVERSE' if ds.PhotometricInterpretation == 'MONOCHROME1' else 'IDENTITY')
            assert ('PixelSpacing' in ds) == ('PixelSpacing' in site.cxr['spacing_tags'])
            assert ('ImagerPixelSpacing' in ds) == ('ImagerPixelSpacing' in site.cxr['spacing_tags'])


def test_ct_and_mr_geometry_is_real(cohort, tables):
    "Slices sit on a line along the slice normal at the stated spacing; InstanceNumber is not always in that order."
    damaged = set(tables['bad'].file)
    reversed_sites = set()
    for study in tables['gt'].query("modality in ['CT', 'MR']").itertuples():
        files = [f for f in (cohort/study.study_dir).rglob('*') if f.is_file()
                 and f.relative_to(cohort).as_posix() not in damaged]
        dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        dss = [d for d in dss if 'ImagePositionPatient' in d]
        if len(dss) < 3: continue
        iop = np.array(dss[0].ImageOrientationPatient, float)
        n = np.cross(iop[:3], iop[3:])
        pos = np.array([np.dot(np.array(d.ImagePositionPatient, float), n) for d in dss])
        order = np.argsort(pos)
        gaps = np.diff(pos[order])
        k = gaps / float(dss[0].SliceThickness)   # whole multiples: a damaged file leaves a gap of two
        assert np.allclose(k, np.round(k), atol=1e-3) and (np.round(k) >= 1).all(), study.study_key
        inst = np.array([int(d.InstanceNumber) for d in dss])[order]
        if (np.diff(inst) < 0).all(): reversed_sites.add(study.site_id)
    assert reversed_sites & {s for s, v in SITES.items() if v.ct['reverse_instance']}


# words a reader would look for; independent of the report writer's own phrase lists
KEYWORDS = {
    'cardiomegaly': r'cardiomegaly|cardiac silhouette|heart size|heart is enlarged|enlarged heart|cardiac enlargement',
    'pleural_effusion': r'effusion|pleural fluid|costophrenic',
    'pneumothorax': r'pneumothora',
    'lung_lesion': r'nodul|mass|lesion',
    'consolidation': r'consolidat|opacit|airspace',
    'atelectasis': r'atelecta|volume loss|collapse',
    'support_devices': r'tube|catheter|line|pacemaker|device',
    'lung_nodule': r'nodul|lesion',
    'emphysema': r'emphysema',
    'fibrosis': r'fibros|fibrotic|reticul|honeycomb|interstitial',
    'brain_mass': r'mass|lesion|tumou?r',
    'white_matter_lesions': r'white matter|hyperintens|periventricular',
    'gallstones': r'gallstone|cholelith|calcul|stone',
    'liver_cyst': r'cyst',
}


def test_reports_agree_with_ground_truth(tables):
    gt = tables['gt'].merge(tables['reports'], on='study_key')
    assert len(gt) == len(tables['gt'])
    n_checked = 0
    for row in gt.itertuples():
        text = row.report_text.lower()
        assert re.search(r'impres+ion|conclusion|opinion|summary|assessment|comment|diagnosis', text), row.study_key
        for f in ALL_FINDINGS:
            truth, said = getattr(row, f), getattr(row, f'report_{f}')
            if pd.isna(truth):
                assert pd.isna(said), (row.study_key, f)
                continue
            if said == 1:
                assert truth == 1, (row.study_key, f, 'reported positive but absent')
            if said == 0:
                assert truth == 0, (row.study_key, f, 'negated but present')
            if said in (1, -1):
                assert re.search(KEYWORDS[f], text), (row.study_key, f, 'mentioned but no keyword in the text')
                n_checked += 1
    assert n_checked > 50
    cxr = gt[gt.modality.isin(['CR', 'DX'])]
    assert (cxr.no_finding == 1).any() and (cxr.no_finding == 0).any()
    # every finding occurs somewhere, positive and absent
    for f in ALL_FINDINGS:
        vals = set(gt[f].dropna())
        assert vals == {0, 1}, (f, vals)


def test_same_seed_gives_byte_identical_files(cohort, tmp_path):
    generate_cohort(tmp_path/'again', workers=1, progress=False, **COHORT_ARGS)
    assert cohort_digest(cohort) == cohort_digest(tmp_path/'again')
    generate_cohort(tmp_path/'other', workers=2, progress=False, **{**COHORT_ARGS, 'n_studies': 10, 'seed': 12})
    generate_cohort(tmp_path/'small', workers=2, progress=False, **{**COHORT_ARGS, 'n_studies': 10})
    assert cohort_digest(tmp_path/'other') != cohort_digest(tmp_path/'small')


def _find_values(ds, values):
    "Values among `values` found anywhere in the dataset, nested sequences and private tags included."
    found = set()
    def walk(d):
        for el in d:
            if el.VR == 'SQ':
                for item in el.value: walk(item)
            elif el.tag != 0x7FE00010:
                s = str(el.value)
                found.update(v for v in values if v and v in s)
    walk(ds)
    return found


def test_injected_phi_is_present_and_listed(cohort, tables):
    gt, phi, reports = tables['gt'], tables['phi'], tables['reports'].set_index('study_key')
    leaked = gt[gt.phi_injected == 1]
    assert len(leaked) == round(COHORT_ARGS['inject_phi'] * len(gt))
    assert set(phi.study_key) == set(leaked.study_key)
    assert set(phi.kind) == set(PHI_KINDS)
    for row in leaked.itertuples():
        kinds = set(row.phi_kinds.split(';'))
        assert kinds == set(phi[phi.study_key == row.study_key].kind)
    damaged = set(tables['bad'].file)
    by_study = {s: g for s, g in phi.groupby('study_key')}
    for s, g in by_study.items():
        study_dir = cohort/gt.set_index('study_key').loc[s, 'study_dir']
        files = [f for f in study_dir.rglob('*') if f.is_file() and f.relative_to(cohort).as_posix() not in damaged]
        hdr = g[g.kind.isin(['header', 'sequence', 'private'])]
        if len(hdr) and files:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            assert set(hdr.value) <= _find_values(ds, set(hdr.value)), s
            if (g.kind == 'private').any():
                assert ds.private_block(0x0029, PRIVATE_CREATOR) is not None
        for v in g[g.kind == 'report'].value: assert v in reports.loc[s, 'report_text'], s
    # no injected value leaks into the ground truth table or clean studies' reports
    gt_text = (cohort/'ground_truth.csv').read_text()
    clean_reports = ' '.join(reports.loc[sorted(set(gt.study_key) - set(leaked.study_key)), 'report_text'])
    for v in set(phi.value):
        assert v not in gt_text
        assert v not in clean_reports


def test_pixel_phi_changes_the_pixels(tmp_path):
    "Burned-in identifiers are really in the pixels: the same study with and without the leak differs only there."
    from rwid_nb.data.phantom import plan_cohort, render_study
    plan = next(p for p in plan_cohort(40, seed=5) if p.modality == 'US')
    import rwid_nb.data.phantom as ph
    render_study(plan, SITES[plan.site_id], tmp_path/'a', 5, inject_phi=False)
    # force the pixel kind: patch the planner for this call
    orig = ph.plan_phi
    ph.plan_phi = lambda rng, idn: {'pixel': f"{idn['dicom_name'].replace('^', ' ')} {idn['mrn']}"}
    try: b = render_study(plan, SITES[plan.site_id], tmp_path/'b', 5, inject_phi=True)
    finally: ph.plan_phi = orig
    fa = next(f for f in (tmp_path/'a').rglob('*') if f.is_file())
    fb = next(f for f in (tmp_path/'b').rglob('*') if f.is_file())
    pa, pb = pydicom.dcmread(fa).pixel_array.astype(int), pydicom.dcmread(fb).pixel_array.astype(int)
    diff = np.abs(pa - pb).max(axis=-1) > 60
    assert diff.any() and diff[..., :diff.shape[-2]//3, :].sum() > 0.9*diff.sum()  # text in the top band
    assert [r['kind'] for r in b['phi']] == ['pixel', 'pixel']


@pytest.mark.filterwarnings('ignore:End of file reached')
def test_damage_is_real_and_listed(cohort, tables):
    bad = tables['bad']
    assert len(bad) > 0 and set(bad.kind) <= set(CORRUPTION_KINDS)
    gt = tables['gt'].set_index('study_key')
    for row in bad.itertuples():
        f = cohort/row.file
        assert f.is_file()
        assert gt.loc[row.study_key, 'corrupted'] == 1 and row.kind in gt.loc[row.study_key, 'corruption_kinds']
        if row.kind == 'not_dicom':
            with pytest.raises(InvalidDicomError): pydicom.dcmread(f)
        elif row.kind == 'no_pixel_data':
            assert 'PixelData' not in pydicom.dcmread(f)
        elif row.kind == 'wrong_dimensions':
            with pytest.raises(Exception): pydicom.dcmread(f).pixel_array
        else:  # truncated: either the header or the pixels cannot be read
            with pytest.raises(Exception): pydicom.dcmread(f).pixel_array
    undamaged = set(gt.index[gt.corrupted == 0])
    assert undamaged and not set(bad.study_key) & undamaged


def test_bad_arguments_fail_cleanly(tmp_path):
    with pytest.raises(ValueError, match='inject_phi'): generate_cohort(tmp_path/'a', 2, inject_phi=1.5, progress=False)
    with pytest.raises(ValueError, match='XR'): generate_cohort(tmp_path/'b', 2, modalities=['XR'], progress=False)
    assert not (tmp_path/'a').exists() and not (tmp_path/'b').exists()
