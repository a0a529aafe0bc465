"""PHI in free text (rwid_nb.data.report_phi): hand-written positives and clinical negatives, the phantom's injected
report PHI (recall per kind, false positives), short header values, and logs that never carry the values found.

Nothing here prints a matched value: failures name rules, kinds, study keys and redacted text only."""
import io, logging, os, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rwid_nb.data.phantom import generate_cohort, phantom_reports as _phantom_reports
from rwid_nb.data.report_phi import REPORT_PHI_RULES, PhiHit, audit_report_texts, find_phi, phi_rules, redact


def covered(text, value, rule=None):
    "Does one hit (of `rule`, if given) cover every occurrence of `value` in `text`?"
    hits = find_phi(text)
    starts = [i for i in range(len(text)) if text.startswith(value, i)]
    assert starts, 'test bug: value not in text'
    return all(any(h.start <= i and h.end >= i + len(value) and (rule is None or h.rule == rule) for h in hits) for i in starts)


# (rule, text, the part that must be covered by a hit of that rule): formats real reports and headers use.
POSITIVES = [
    ('person_name', 'Findings discussed with Dr. Smith at 14:30.', 'Smith'),
    ('person_name', 'DR SMITH NOTIFIED OF FINDINGS.', 'SMITH'),
    ('person_name', 'Electronically signed by: J. Smith, MD', 'J. Smith'),
    ('person_name', 'Dictated by: Jane Doe\nTranscribed by: ABC', 'Jane Doe'),
    ('person_name', 'Attending: Robert Chen', 'Robert Chen'),
    ('person_name', 'Reviewed with Jane Doe, NP.', 'Jane Doe'),
    ('person_name', "Dr. O'Brien was informed by telephone.", "O'Brien"),
    ('person_name', 'Case reviewed with Prof. Müller.', 'Müller'),
    ('person_name', 'Patient: Maria Silva', 'Maria Silva'),
    ('person_name', 'Patient name: SILVA^MARIA', 'SILVA^MARIA'),
    ('person_name', 'Findings were discussed with the patient, Maria Silva.', 'Maria Silva'),
    ('person_name', 'Referring physician: Dr. Wanjiru Kamau', 'Wanjiru Kamau'),
    ('person_name', 'SIGNED BY: JOHN SMITH, MD', 'JOHN SMITH'),
    ('person_name', 'Reported by John A. Smith MD', 'John A. Smith'),
    ('person_name', 'Results called to Dr. van der Berg.', 'van der Berg'),
    ('person_name', 'Critical result d/w Dr. Chen at 09:10.', 'Chen'),
    ('person_name', 'Verified by Dr. Aisha Okafor, FRCR.', 'Aisha Okafor'),
    ('person_name', 'Mrs Patel was informed of the result.', 'Patel'),
    ('person_name', 'OTIENO^JURGEN', 'OTIENO^JURGEN'),
    ('date', 'DOB 3/4/1955', '3/4/1955'),
    ('date', 'Comparison: CT of 05-Jan-2021.', '05-Jan-2021'),
    ('date', 'Prior 1/5/21 showed the same.', '1/5/21'),
    ('date', 'Seen on January 5th, 2021.', 'January 5th, 2021'),
    ('date', 'Compared with 2021-03-14.', '2021-03-14'),
    ('date', 'Verglichen mit 14.03.2021.', '14.03.2021'),
    ('date', 'Exam date: 14 March 2021', '14 March 2021'),
    ('date', 'Dictated March 14, 2021.', 'March 14, 2021'),
    ('date', 'Stable since Jan 2019.', 'Jan 2019'),
    ('date', 'StudyDate 20210314', '20210314'),
    ('mrn', 'MRN 12345678', '12345678'),
    ('mrn', 'Acc# A1234567', 'A1234567'),
    ('mrn', 'Hospital no. 9876543', '9876543'),
    ('mrn', 'Images reviewed under patient ID 34567890.', '34567890'),
    ('mrn', 'NHS number 943 476 5919', '943 476 5919'),
    ('mrn', 'SSN 123-45-6789', '123-45-6789'),
    ('phone', 'Please call (617) 555-0123 with questions.', '(617) 555-0123'),
    ('phone', 'Reporting room +44 20 7946 0958.', '+44 20 7946 0958'),
    ('phone', 'Results phoned to 555.123.4567.', '555.123.4567'),
    ('phone', 'For queries call 555-012-3456.', '555-012-3456'),
    ('phone', 'tel: 0161 234 5678', '0161 234 5678'),
    ('phone', 'Radiologist on pager 4521.', '4521'),
    ('email', 'Copy sent to kamau.a@mail.example.net.', 'kamau.a@mail.example.net'),
    ('email', 'QUERIES: JOHN.DOE@EXAMPLE.COM', 'JOHN.DOE@EXAMPLE.COM'),
    ('long_digit_run', 'Ref 123456789 on file', '123456789'),
    ('url', 'Images at https://pacs.example.org/viewer?id=3.', 'https://pacs.example.org/viewer?id=3'),
    ('address', 'Lives at 353 Harbour Road, Nairobi.', '353 Harbour Road'),
    ('address', '7 Rua das Flores, Campinas', '7 Rua das Flores'),
    ('address', 'Home: 210 MG Road, Pune', '210 MG Road'),
    ('address', 'Postcode LS1 3EX', 'LS1 3EX'),
]


@pytest.mark.parametrize('rule,text,value', POSITIVES, ids=[f'{r}-{i}' for i, (r, _, _) in enumerate(POSITIVES)])
def test_positive(rule, text, value):
    assert covered(text, value, rule), redact(text)


# Clinical text and header descriptions that look like PHI and are not.
NEGATIVES = [
    'Right upper lobe nodule measuring 3.5 x 2.1 cm.', '12 x 8 x 6 mm lesion in segment 7.', 'A 10 mm nodule.',
    'T2/FLAIR hyperintensity in the periventricular white matter.', 'Disc osteophyte complex at C5-C6.', 'Protrusion at L4/5.',
    'BI-RADS 4.', 'ASPECTS 10.', 'Occupies 1/2 of the lobe.', 'Involves 2/3 of the liver.', 'T10 compression fracture.',
    'Degenerative change at L4-L5 and L5-S1.', 'C2/3 through C6/7 foraminal narrowing.', 'CT dose 120 kVp, 200 mAs, DLP 1234 mGy-cm.',
    'Given 5 mg IV.', 'Nodule (series 3 image 45) is stable.', 'Reviewed at 14:30.', 'The referring physician was notified.',
    'Findings discussed with the referring physician at 14:30.', 'Reported by: consultant radiologist.', 'Discussed with ICU team.',
    'Results called to ED.', 'Signed by: Consultant Radiologist', 'Findings communicated to Oncology team.', 'Informed Consent obtained.',
    'This may represent atelectasis.', 'Grade 2/3 stenosis.', 'BP 120/80.', 'EF 55-60%.', 'PI-RADS 3.', '1.5 T MRI.',
    'Follow-up in 6-12 months.', 'Fleischner 2017 guidelines apply.', '10000 units heparin.', 'pH 7.354', 'MS plaques.',
    'MRS shows an NAA peak.', 'DR CHEST PA AND LATERAL', 'MR BRAIN WO CONTRAST', 'CT CHEST WO CONTRAST', 'AX T2 FLAIR',
    'SAG T1 MPRAGE 1MM ISO', 'US ABDOMEN LIMITED', 'Thorax 1.25mm B70f', '2 Way Foley catheter in place.',
    'Discussed with Plastics.', 'Requested by: Orthopaedic Surgeon', 'Reviewed by: Attending Radiologist',
    'Ordering provider: Emergency Medicine', 'Spoke with Cardiologist on call.', 'Results given to Intensive Care.',
    'DR AC JOINTS BILATERAL', 'DR CLAVICLE LEFT', 'DR HAND 3 VIEWS LEFT', 'Tech: RT', 'Patient ID: ___',
]
PLACEHOLDERS = ['Dr. ___ was notified.', 'Discussed with Dr. [** Name **] on [**2101-10-20**].', 'XXXX-year-old male.',
                'Dr. XXXX notified.', 'Comparison: XX/XX/XXXX', 'Patient: ___', 'Patient name: ANONYMOUS', 'Seen by [NAME] on <DATE>.',
                'Discussed with Dr. [person_name] on [date].']


@pytest.mark.parametrize('text', NEGATIVES + PLACEHOLDERS)
def test_negative(text):
    assert phi_rules(text) == [], (phi_rules(text), redact(text))


def test_phihit_has_no_text():
    text = 'MRN 12345678. Discussed with Dr. Whitfield on 05-Jan-2021; call (617) 555-0123 or j.doe@example.org.'
    hits = find_phi(text)
    assert {h.rule for h in hits} >= {'mrn', 'person_name', 'date', 'phone', 'email'}
    shown = repr(hits) + str(hits) + ' '.join(map(str, hits))
    for h in hits:
        assert isinstance(h, PhiHit) and h.rule in REPORT_PHI_RULES
        assert text[h.start:h.end] not in shown
    for v in ('12345678', 'Whitfield', '05-Jan-2021', '555-0123', 'example.org'): assert v not in shown


def test_phi_rules_and_redact():
    assert phi_rules(None) == [] and phi_rules('') == [] and phi_rules(float('nan')) == []
    text = 'Patient: Maria Silva  MRN 1234567890\nFINDINGS: 12 x 8 mm nodule at L4/5. Queries: a.b@example.org'
    assert phi_rules(text) == ['email', 'long_digit_run', 'mrn', 'person_name']
    r = redact(text)
    for v in ('Maria', 'Silva', '1234567890', 'a.b@example.org'): assert v not in r
    assert '12 x 8 mm nodule at L4/5' in r and redact(r) == r and find_phi(r) == []


def test_audit_report_texts_table():
    df = pd.DataFrame({'study_key': ['a', 'b', 'c', 'd'],
                       'report_text': ['No acute process.', 'Discussed with Dr. Tanaka.', '  ', None]})
    out = audit_report_texts(df)
    assert list(out.columns) == ['study_key', 'report_audit_status', 'report_audit_findings']
    assert out.report_audit_status.tolist() == ['clean', 'flagged', 'missing', 'missing']
    assert out.report_audit_findings.tolist() == [[], ['report:person_name'], [], []]
    with pytest.raises(KeyError, match='text_col'): audit_report_texts(df, text_col='text')


# ---- the phantom: the report PHI it injects, and the clean reports it writes

def phantom_reports(n_studies, seed, inject_phi, modalities=None):
    "(reports, report injections) of the cohort `generate_cohort` would write, without pixels."
    pr = _phantom_reports(n_studies, seed, inject_phi, modalities=modalities)
    return pr['reports'], pr['report_phi']


def score(reports, injections):
    "Per-kind recall {kind: (found, injected)}, false positives, clean reports."
    texts = dict(zip(reports.study_key, reports.report_text))
    rec = {}
    for k, kind, v in injections[['study_key', 'location', 'value']].itertuples(index=False):
        f, n = rec.get(kind, (0, 0))
        rec[kind] = (f + covered(texts[k], v), n + 1)
    clean = set(reports.study_key) - set(injections.study_key)
    return rec, sum(bool(find_phi(texts[k])) for k in clean), len(clean)


def read_cohort(root):
    reports = pd.read_csv(root/'reports.csv', keep_default_na=False)
    phi = pd.read_csv(root/'phi_injections.csv', dtype=str, keep_default_na=False)
    return reports, phi


def test_phantom_cohort_recall_and_false_positives(cohort):
    reports, phi = read_cohort(cohort)
    rec, fp, n_clean = score(reports, phi[phi.kind == 'report'])
    assert set(rec) == {'person_name', 'date', 'mrn', 'phone', 'email'}, sorted(rec)
    assert {k: f / n for k, (f, n) in rec.items()} == {k: 1.0 for k in rec}, rec
    assert fp <= 0.01 * n_clean, (fp, n_clean)


def test_report_only_phantom_matches_generate_cohort(cohort, tables):
    "The pixel-free report corpus used for the big sweeps is the generator's own output, study for study."
    reports, phi = read_cohort(cohort)
    r, i = phantom_reports(tables['gt'].shape[0], 11, 0.3)
    assert r.to_dict('records') == reports.to_dict('records')
    assert i.astype(str).to_dict('records') == phi[phi.kind == 'report'].to_dict('records')


def test_phantom_sweep_recall_and_false_positives():
    reports, inj = phantom_reports(3000, 99, 0.3)
    t0 = time.perf_counter()
    rec, fp, n_clean = score(reports, inj)
    print(f'{len(reports)} reports, {len(inj)} injected values, {fp}/{n_clean} clean flagged, '
          f'{(time.perf_counter() - t0) / len(reports) * 1e6:.0f} us/report (with scoring)')
    assert {k: f / n for k, (f, n) in rec.items()} == {k: 1.0 for k in ('person_name', 'date', 'mrn', 'phone', 'email')}, rec
    assert fp <= 0.01 * n_clean, (fp, n_clean)


def test_audit_output_and_logs_hold_no_injected_value(cohort, capfd, tmp_path):
    reports, phi = read_cohort(cohort)
    values = phi[phi.kind == 'report'].value.tolist()
    buf, logger = io.StringIO(), logging.getLogger('rwid_nb')
    handler, level = logging.StreamHandler(buf), logger.level
    handler.setLevel(logging.DEBUG); logger.addHandler(handler); logger.setLevel(logging.DEBUG)
    try: out = audit_report_texts(reports, progress=True)
    finally: logger.removeHandler(handler); logger.setLevel(level)
    captured = capfd.readouterr()
    out.to_csv(tmp_path/'report_audit.csv', index=False)
    manifest = (tmp_path/'report_audit.csv').read_text()
    logs = buf.getvalue()
    assert 'report PHI audit' in logs and 'flagged' in logs
    for where, s in (('log', logs), ('stdout', captured.out), ('stderr', captured.err), ('manifest', manifest)):
        assert not [v for v in values if v in s], f'an injected report value appears in the {where}'
    flagged = set(out.study_key[out.report_audit_status == 'flagged'])
    assert set(phi[phi.kind == 'report'].study_key) <= flagged


def test_header_values_short_strings(cohort, tables):
    """Header leaks are short strings: names in DICOM form, birth dates, MRNs, addresses must all be found on their own.

    (Burned-in pixel text is left out: it is read by OCR, and its bare 'FIRST LAST' name has no cue a text rule can use.)"""
    phi = tables['phi']
    leaks = phi[phi.kind.isin(['header', 'sequence', 'private'])]
    assert len(leaks) > 10
    missed = [loc for loc, v in leaks[['location', 'value']].itertuples(index=False) if not covered(v, v)]
    assert missed == [], sorted(set(missed))


def test_clean_header_descriptions_not_flagged(cohort, tables):
    "Free-text header values of studies without injected PHI (descriptions, protocol, institution, device) stay clean."
    import pydicom
    gt = tables['gt']
    keys = ('StudyDescription', 'SeriesDescription', 'ProtocolName', 'ImageComments', 'BodyPartExamined', 'InstitutionName',
            'Manufacturer', 'ManufacturerModelName', 'StationName', 'SoftwareVersions', 'PerformedProcedureStepDescription')
    seen, flagged = 0, []
    for d in gt.loc[gt.phi_injected == 0, 'study_dir']:
        for f in sorted(p for p in (cohort/d).rglob('*') if p.is_file())[:1]:
            try: ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception: continue
            for k in keys:
                v = str(ds.get(k, '') or '')
                if v:
                    seen += 1
                    if phi_rules(v): flagged.append((k, phi_rules(v)))
    assert seen > 100
    assert flagged == [], flagged[:5]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('RWID_SLOW'), reason='writes a 400-study cohort (minutes); set RWID_SLOW=1')
def test_phantom_400_cohort(tmp_path):
    generate_cohort(tmp_path/'c', 400, seed=2024, inject_phi=0.3, workers=None, progress=False, overwrite=True)
    reports, phi = read_cohort(tmp_path/'c')
    rec, fp, n_clean = score(reports, phi[phi.kind == 'report'])
    assert {k: f / n for k, (f, n) in rec.items()} == {k: 1.0 for k in ('person_name', 'date', 'mrn', 'phone', 'email')}, rec
    assert fp <= 0.01 * n_clean, (fp, n_clean)
