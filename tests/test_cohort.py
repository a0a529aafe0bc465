"""Cohorts and splits: property tests of the patient-level split over random studies tables (no patient in two
splits, held-out sites only in 'ood', every study split once, deterministic, fractions honoured), cohort definition
errors, the shipped definitions, and build / write on the phantom."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, assume, HealthCheck, strategies as st

from rwid_nb.data.cohort import (CohortDefinition, CohortDefinitionError, load_cohort_definition, select_studies,
                                 split_patients, build_cohort, write_split, read_studies, split_summary, SPLITS, OOD)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT/'data_manifests'
SITES = ['S01', 'S02', 'S03', 'S04', 'S05', 'S06']
MODALITIES = ['CR', 'DX', 'CT', 'MR', 'US', None]
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------- strategies
@st.composite
def studies_tables(draw, max_patients=40, multi_site=True):
    "A random studies table: patients with 1-4 studies at a home site, some also seen at other sites."
    sites = SITES[:draw(st.integers(1, len(SITES)))]
    n = draw(st.integers(0, max_patients))
    rows = []
    for p in range(n):
        home = draw(st.sampled_from(sites))
        mod = draw(st.sampled_from(MODALITIES))
        for k in range(draw(st.integers(1, 4))):
            site = draw(st.sampled_from(sites)) if multi_site and draw(st.integers(0, 4)) == 0 else home
            m = draw(st.sampled_from(MODALITIES)) if multi_site and draw(st.integers(0, 4)) == 0 else mod
            rows.append(dict(study_key=f'K{p}-{k}', patient_key=f'P{p}', site_id=site, modality=m, n_series=k + 1))
    df = pd.DataFrame(rows, columns=['study_key', 'patient_key', 'site_id', 'modality', 'n_series'])
    return df.sample(frac=1, random_state=draw(st.integers(0, 2**16))).reset_index(drop=True) if len(df) else df


@st.composite
def fractions(draw):
    "Random train/val/test fractions summing to 1 (some may be 0, a split may be left out)."
    w = [draw(st.integers(0, 10)) for _ in SPLITS]
    assume(sum(w) > 0)
    fr = {s: x/sum(w) for s, x in zip(SPLITS, w)}
    return {s: v for s, v in fr.items() if v > 0 or draw(st.booleans())}


held_out = st.lists(st.sampled_from(SITES + ['S99']), max_size=3, unique=True)  # S99: a site with no studies
stratify = st.sampled_from([[], ['site_id'], ['modality'], ['site_id', 'modality']])
seeds = st.integers(0, 2**32 - 1)


def _patient_splits(df):
    return df.groupby('patient_key')['split'].agg(lambda s: set(s))


# ---------------------------------------------------------------------------------------------------- properties
@PROPS
@given(studies_tables(), fractions(), stratify, held_out, seeds)
def test_no_patient_in_two_splits(df, fr, strat, held, seed):
    out = split_patients(df, fr, strat, held, seed)
    assert (_patient_splits(out).map(len) == 1).all() if len(out) else True
    for a in (*SPLITS, OOD):
        for b in (*SPLITS, OOD):
            if a < b:
                assert not set(out.patient_key[out.split == a]) & set(out.patient_key[out.split == b])


@PROPS
@given(studies_tables(), fractions(), stratify, held_out, seeds)
def test_held_out_sites_only_in_ood(df, fr, strat, held, seed):
    out = split_patients(df, fr, strat, held, seed)
    at_held = out.site_id.isin(held)
    assert (out.split[at_held] == OOD).all()
    assert not out.loc[out.split.isin(SPLITS), 'site_id'].isin(held).any()
    # 'ood' holds exactly the patients with a study at a held-out site (multi-site patients wholly)
    assert set(out.patient_key[out.split == OOD]) == set(out.patient_key[at_held])


@PROPS
@given(studies_tables(), fractions(), stratify, held_out, seeds)
def test_every_study_gets_exactly_one_split(df, fr, strat, held, seed):
    out = split_patients(df, fr, strat, held, seed)
    assert len(out) == len(df) and list(out.columns) == [*df.columns, 'split']
    pd.testing.assert_frame_equal(out.drop(columns='split'), df)  # input rows untouched, same order
    assert out.split.isin([*SPLITS, OOD]).all()
    # a split with fraction 0 receives nobody
    for s in SPLITS:
        if fr.get(s, 0) == 0: assert not (out.split == s).any()
    assert 'split' not in df.columns  # the input was not modified


@PROPS
@given(studies_tables(), fractions(), stratify, held_out, seeds, st.integers(0, 2**16))
def test_deterministic_for_a_seed_whatever_the_row_order(df, fr, strat, held, seed, shuffle):
    a = split_patients(df, fr, strat, held, seed)
    b = split_patients(df.sample(frac=1, random_state=shuffle), fr, strat, held, seed)
    assert a.set_index('study_key').split.sort_index().equals(b.set_index('study_key').split.sort_index())
    pd.testing.assert_frame_equal(a, split_patients(df, fr, strat, held, seed))


@PROPS
@given(studies_tables(max_patients=60, multi_site=False), fractions(), seeds)
def test_each_stratum_within_one_patient_of_its_share(df, fr, seed):
    # single-site, single-modality patients: each patient's stratum is unambiguous
    out = split_patients(df, fr, ['site_id', 'modality'], [], seed)
    pats = out.drop_duplicates('patient_key').assign(modality=lambda d: d.modality.fillna('<NA>'))
    train = fr.get('train', 0)
    for _, g in pats.groupby(['site_id', 'modality']):
        n = len(g)
        if n == 1 and train > 0:
            assert g.split.iloc[0] == 'train'  # a one-patient stratum trains
        if n*train < 1 and train > 0: continue  # the train-at-least-one rule may move one patient
        for s in SPLITS:
            assert abs((g.split == s).sum() - n*fr.get(s, 0)) < 1 + 1e-9


@PROPS
@given(st.lists(st.integers(2, 7), min_size=1, max_size=120), fractions(), seeds)
def test_overall_fractions_hold_over_many_small_strata(sizes, fr, seed):
    # rounding each small stratum on its own would starve the small splits (40 strata of 3 at .7/.1/.2 -> no val)
    assume(fr.get('train', 0) == 0 or all(n*fr['train'] >= 1 for n in sizes))  # the train-at-least-one rule is idle
    rows = [dict(study_key=f'K{i}-{j}', patient_key=f'P{i}-{j}', site_id=f'S{i}', modality='CR')
            for i, n in enumerate(sizes) for j in range(n)]
    out = split_patients(pd.DataFrame(rows), fr, ['site_id'], [], seed)
    for s in SPLITS: assert abs((out.split == s).sum() - len(out)*fr.get(s, 0)) < 1.5


def _big(n_patients=6000, seed=0):
    rng = np.random.default_rng(seed)
    sites, mods = rng.choice(SITES, n_patients), rng.choice(['CR', 'DX', 'CT', 'MR', 'US'], n_patients)
    k = rng.integers(1, 5, n_patients)
    return pd.DataFrame({'study_key': [f'K{p}-{i}' for p in range(n_patients) for i in range(k[p])],
                         'patient_key': np.repeat([f'P{p}' for p in range(n_patients)], k),
                         'site_id': np.repeat(sites, k), 'modality': np.repeat(mods, k)})


@settings(max_examples=10, deadline=None)
@given(fractions(), seeds)
def test_fractions_honoured_on_big_inputs(fr, seed):
    df = _big()
    out = split_patients(df, fr, ['site_id', 'modality'], ['S06'], seed)
    ind = out[out.split != OOD]
    pats = ind.drop_duplicates('patient_key').split.value_counts(normalize=True)
    studies = ind.split.value_counts(normalize=True)
    for s in SPLITS:
        assert abs(pats.get(s, 0) - fr.get(s, 0)) < 0.005, (s, pats.get(s, 0), fr.get(s, 0))
        assert abs(studies.get(s, 0) - fr.get(s, 0)) < 0.05, (s, studies.get(s, 0), fr.get(s, 0))
    # every site and modality is in every split with a usable fraction
    for s in SPLITS:
        if fr.get(s, 0) >= 0.1:
            part = ind[ind.split == s]
            assert set(part.site_id) == set(SITES) - {'S06'} and part.modality.nunique() == 5


def test_seed_changes_the_split():
    df = _big(2000)
    fr = {'train': 0.7, 'val': 0.1, 'test': 0.2}
    a, b = (split_patients(df, fr, ['site_id'], [], s).split for s in (1, 2))
    assert (a != b).mean() > 0.1


def test_multi_site_patient_with_a_held_out_study_goes_wholly_to_ood():
    df = pd.DataFrame({'study_key': ['a1', 'a2', 'a3', 'b1', 'b2'], 'patient_key': ['A', 'A', 'A', 'B', 'B'],
                       'site_id': ['S01', 'S01', 'S02', 'S01', 'S03'], 'modality': ['CT', 'CT', 'CT', 'CR', 'CR']})
    out = split_patients(df, {'train': 1.0}, ['site_id'], ['S02'], 0)
    assert out.split.tolist() == ['ood', 'ood', 'ood', 'train', 'train']


def test_split_input_errors():
    df = pd.DataFrame({'study_key': ['a'], 'patient_key': [None], 'site_id': ['S01'], 'modality': ['CT']})
    with pytest.raises(ValueError, match='no patient_key'): split_patients(df, {'train': 1.0}, [], [], 0)
    with pytest.raises(ValueError, match='must sum to 1'): split_patients(df, {'train': 0.6, 'test': 0.3}, [], [], 0)
    with pytest.raises(ValueError, match="no column 'body_part'"): split_patients(df, {'train': 1.0}, ['body_part'], [], 0)
    empty = split_patients(df.iloc[:0], {'train': 1.0}, ['site_id'], ['S01'], 0)
    assert len(empty) == 0 and 'split' in empty


# ---------------------------------------------------------------------------------------------------- definitions
GOOD = '''[cohort]
name = "{name}"
version = 1
description = "test"
[filters]
modalities = ["CR"]
[split]
fractions = {{ train = 0.8, val = 0.1, test = 0.1 }}
held_out_sites = ["S05"]
seed = 3
'''


def _write(tmp_path, text, name='demo.v1.toml'):
    f = tmp_path/name
    f.write_text(text)
    return f


@pytest.mark.parametrize('edit, key', [
    (lambda t: t.replace('modalities', 'modality'), 'modality'),                          # unknown key
    (lambda t: t + '[extras]\nx = 1\n', 'extras'),                                        # unknown section
    (lambda t: t.replace('seed = 3', 'seed = "3"'), 'seed'),                              # wrong type
    (lambda t: t.replace('seed = 3', 'seed = true'), 'seed'),                             # bool is not an int
    (lambda t: t.replace('modalities = ["CR"]', 'modalities = "CR"'), 'modalities'),      # a string, not a list
    (lambda t: t.replace('modalities = ["CR"]', 'min_age = "18"'), 'min_age'),
    (lambda t: t.replace('modalities = ["CR"]', 'min_age = 70\nmax_age = 18'), 'min_age'),
    (lambda t: t.replace('test = 0.1', 'test = 0.2'), 'fractions'),                       # sums to 1.1
    (lambda t: t.replace('test = 0.1', 'holdout = 0.1'), 'fractions'),                    # unknown split
    (lambda t: t.replace('modalities = ["CR"]', 'sites = ["S01", "S05"]'), 'held_out_sites'),  # held out and kept
    (lambda t: t.replace('modalities = ["CR"]', 'sex = ["female"]'), 'sex'),
    (lambda t: t.replace('modalities = ["CR"]', 'exclude_audit_status = ["dirty"]'), 'exclude_audit_status'),
    (lambda t: t.replace('modalities = ["CR"]', 'labels = { cardiomegaly = [2] }'), 'labels.cardiomegaly'),
    (lambda t: t.replace('modalities = ["CR"]', 'labels = { require_any = [] }'), 'labels.require_any'),
    (lambda t: t.replace('seed = 3', 'seed = 3\nunit = "study"'), 'unit'),
    (lambda t: t.replace('seed = 3\n', ''), 'seed'),                                      # required
    (lambda t: t.replace('version = 1', 'version = 2'), 'version'),                       # file says v1
    (lambda t: t.replace('name = "demo"', 'name = "other"'), 'name'),                     # file says demo
    (lambda t: t.replace('version = 1', 'version = 1.5'), 'version'),
    (lambda t: t.replace('[cohort]\n', '[cohort\n'), 'TOML'),                             # syntax error
])
def test_definition_errors_are_one_line_naming_file_and_key(tmp_path, edit, key):
    f = _write(tmp_path, edit(GOOD.format(name='demo')))
    with pytest.raises(CohortDefinitionError) as e: load_cohort_definition(f)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(str(f)) and key in msg, msg
    assert isinstance(e.value, ValueError)


def test_definition_good_and_missing(tmp_path):
    d = load_cohort_definition(_write(tmp_path, GOOD.format(name='demo')))
    assert (d.name, d.version, d.label) == ('demo', 1, 'demo.v1')
    assert d.split['stratify'] == ['site_id', 'modality'] and d.split['unit'] == 'patient'  # defaults
    with pytest.raises(CohortDefinitionError, match='no such cohort definition'): load_cohort_definition(tmp_path/'nope.v1.toml')
    # any file name is allowed; only <name>.v<N>.toml names are checked against the contents
    assert load_cohort_definition(_write(tmp_path, GOOD.format(name='demo'), 'scratch.toml')).name == 'demo'
    # built in code: the same checks
    with pytest.raises(CohortDefinitionError, match=r"\[split\] fractions"):
        CohortDefinition('x', 1, split={'fractions': {'train': 2.0}, 'seed': 0})


@pytest.mark.parametrize('name', sorted(p.name for p in MANIFESTS.glob('*.toml')))
def test_shipped_definitions_load(name):
    d = load_cohort_definition(MANIFESTS/name)
    assert d.path == MANIFESTS/name and f'{d.label}.toml' == name
    assert math.isclose(sum(d.split['fractions'].values()), 1)
    assert not set(d.split['held_out_sites']) & set(d.filters.get('sites', []))


def test_both_shipped_definitions_exist():
    assert {p.name for p in MANIFESTS.glob('*.toml')} >= {'phantom_default.v1.toml', 'chest_radiographs.v1.toml'}


# ---------------------------------------------------------------------------------------------------- selection
def _table():
    return pd.DataFrame({'study_key': list('abcdefgh'), 'patient_key': list('ppqqrstu'),
                         'site_id': ['S01', 'S01', 'S02', 'S02', 'S03', 'S01', 'S05', 'S02'],
                         'modality': ['CR', 'DX', 'CT', 'cr', 'CR', 'CR', 'DX', None],
                         'body_part': ['CHEST']*8,
                         'patient_age_band': ['10-19', '18-29', '60-69', '90+', None, '40-49', '50-59', '30-39'],
                         'patient_sex': ['F', 'M', 'F', None, 'O', 'M', 'F', 'F'],
                         'audit_status': ['clean', 'clean', 'flagged', 'clean', 'quarantined', None, 'clean', 'clean']})


def test_select_rules():
    d = CohortDefinition('t', 1, filters={'modalities': ['CR', 'DX'], 'min_age': 18, 'max_age': 120,
                                          'exclude_audit_status': ['flagged', 'quarantined']},
                         split={'fractions': {'train': 1.0}, 'seed': 0})
    sel, table = select_studies(d, _table(), return_table=True, verbose=False)
    # a: band 10-19 straddles 18; c: CT; e: no band; h: no modality; d: 'cr' matches, 90+ is within 120; f: status missing = clean
    assert sel.study_key.tolist() == ['b', 'd', 'f', 'g']
    assert table['filter'].tolist() == ['input', 'modalities', 'age', 'audit_status']
    assert table.dropped.sum() == 4 and table.remaining.iloc[-1] == 4
    assert table.set_index('filter').loc['age', 'failed'] == 2
    d100 = CohortDefinition('t', 1, filters={'max_age': 100}, split={'fractions': {'train': 1.0}, 'seed': 0})
    assert 'd' not in set(select_studies(d100, _table(), verbose=False).study_key)  # 90+ may exceed 100


def test_select_sites_sex_and_missing_audit_column():
    d = CohortDefinition('t', 1, filters={'sites': ['S01'], 'sex': ['F', 'M'], 'exclude_audit_status': ['flagged']},
                         split={'fractions': {'train': 1.0}, 'held_out_sites': ['S05'], 'seed': 0})
    sel, table = select_studies(d, _table().drop(columns='audit_status'), return_table=True, verbose=False)
    assert sel.study_key.tolist() == ['a', 'b', 'f', 'g']  # S01 plus the held-out S05
    assert 'clean' in table.set_index('filter').loc['audit_status', 'rule']


def test_select_labels_and_errors():
    labels = pd.DataFrame({'study_key': ['a', 'b', 'c'], 'cardiomegaly': [1, 0, None], 'effusion': [None, -1, 1]})
    d = CohortDefinition('t', 1, filters={'labels': {'require_any': ['cardiomegaly'], 'effusion': [-1, 0, 1]}},
                         split={'fractions': {'train': 1.0}, 'seed': 0})
    assert select_studies(d, _table(), labels, verbose=False).study_key.tolist() == ['b']
    with pytest.raises(ValueError, match='duplicate study_key'):
        select_studies(d, pd.concat([_table(), _table()]), labels, verbose=False)
    with pytest.raises(ValueError, match=r"needs finding column\(s\) \['cardiomegaly', 'effusion'\]"):
        select_studies(d, _table(), verbose=False)
    bad = _table().assign(patient_age_band=['oops'] + [None]*7)
    d = CohortDefinition('t', 1, filters={'min_age': 18}, split={'fractions': {'train': 1.0}, 'seed': 0})
    with pytest.raises(ValueError, match='study_key a') as e: select_studies(d, bad, verbose=False)
    assert 'oops' not in str(e.value)  # values of the table are never echoed


# ---------------------------------------------------------------------------------------------------- build and write
def test_build_from_shards_and_write(tmp_path):
    df = _big(300)
    df['body_part'], df['patient_age_band'], df['patient_sex'] = 'CHEST', '40-49', 'F'
    (tmp_path/'index').mkdir()
    for i, lo in enumerate(range(0, len(df), 400)): df.iloc[lo:lo + 400].to_parquet(tmp_path/'index'/f'studies-{i:05d}.parquet')
    defn = MANIFESTS/'phantom_default.v1.toml'
    out = build_cohort(defn, tmp_path/'index')
    assert len(out) == len(df) and out.split.notna().all()
    assert (out.split[out.site_id.isin(['S05', 'S06'])] == OOD).all()
    for suffix in ('parquet', 'csv'):
        f = write_split(out, tmp_path/'splits'/f'cohort.{suffix}')
        back = read_studies(f)
        assert back.set_index('study_key').split.equals(out.set_index('study_key').split)
        assert not list(f.parent.glob('.*tmp'))  # no temporary files left behind
    with pytest.raises(ValueError, match=r'\.parquet or \.csv'): write_split(out, tmp_path/'cohort.txt')
    with pytest.raises(ValueError, match="no 'split' column"): write_split(df, tmp_path/'cohort.csv')
    with pytest.raises(FileNotFoundError, match='no studies'): read_studies(tmp_path/'splits')


def test_build_on_the_phantom(tables, tmp_path):
    gt = tables['gt']
    band = lambda a: '90+' if a >= 90 else f'{a//10*10}-{a//10*10 + 9}'
    studies = pd.DataFrame({'study_key': gt.study_key, 'patient_key': gt.patient_key, 'site_id': gt.site_id,
                            'modality': gt.modality, 'body_part': gt.body_part, 'patient_age_band': gt.age.map(band),
                            'patient_sex': gt.sex, 'audit_status': np.where(gt.phi_injected == 1, 'flagged', 'clean')})
    studies.to_parquet(tmp_path/'studies.parquet')
    for name in ('phantom_default.v1.toml', 'chest_radiographs.v1.toml'):
        d = load_cohort_definition(MANIFESTS/name)
        out = build_cohort(d, tmp_path, labels=None)
        held = d.split['held_out_sites']
        assert (out.groupby('patient_key').split.nunique() == 1).all()
        assert (out.split[out.site_id.isin(held)] == OOD).all() and not out.audit_status.eq('flagged').any()
        assert set(out.modality) <= set(d.filters['modalities'])
        assert set(split_summary(out).columns) >= {'train', 'total'}
    # the labels table (the ground truth) joins by study_key
    cm = CohortDefinition('cm', 1, filters={'labels': {'cardiomegaly': [1]}}, split={'fractions': {'train': 1.0}, 'seed': 0})
    sel = select_studies(cm, studies, gt, verbose=False)
    # ... and the PHI gate holds even for a definition that does not ask for it
    assert set(sel.study_key) == set(gt.study_key[(gt.cardiomegaly == 1) & (gt.phi_injected == 0)])
