"""The `rwid` command as a user meets it: help, subcommands, and one clear error line for bad input."""
import os, sys, json, subprocess
from pathlib import Path
import pytest

from conftest import ROOT

RWID = Path(sys.executable).with_name('rwid')


def run(*args, env=None, cwd=ROOT):
    e = {**os.environ, **(env or {})}
    return subprocess.run([str(RWID), *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd, timeout=600)


def test_help_lists_subcommands():
    r = run('--help')
    assert r.returncode == 0
    for sub in ('phantom', 'demo', 'settings'): assert sub in r.stdout
    r = run('phantom', '--help')
    assert r.returncode == 0 and '--inject-phi' in r.stdout and '--corrupt' in r.stdout


def test_phantom_writes_the_documented_interface(tmp_path):
    r = run('phantom', tmp_path/'c', '--studies', 6, '--seed', 3, '--inject-phi', 0.5, '--corrupt', 0.2, '--quiet')
    assert r.returncode == 0, r.stderr
    assert 'phantom cohort: 6 studies' in r.stdout
    import pandas as pd
    rep = pd.read_csv(tmp_path/'c'/'reports.csv')
    gt = pd.read_csv(tmp_path/'c'/'ground_truth.csv')
    assert list(rep.columns) == ['study_key', 'report_text'] and len(rep) == 6
    for col in ('study_key', 'patient_key', 'site_id', 'modality', 'age', 'sex', 'cardiomegaly', 'lung_nodule',
                'phi_injected', 'phi_kinds', 'corrupted', 'corruption_kinds'):
        assert col in gt.columns, col
    assert (tmp_path/'c'/'dicom').is_dir()


@pytest.mark.parametrize('args,needle', [
    (['--studies', '0'], 'positive integer'),
    (['--inject-phi', '2'], 'fraction'),
    (['--corrupt', 'lots'], 'fraction'),
    (['--sites', 'S01,S77'], 'S77'),
    (['--modalities', 'PET'], 'PET'),
])
def test_bad_arguments_give_one_line(tmp_path, args, needle):
    r = run('phantom', tmp_path/'c', *args, '--quiet')
    assert r.returncode != 0
    assert needle in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'c').exists()


def test_unwritable_or_occupied_output(tmp_path):
    ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path/'file.txt'; target.write_text('x'); out = target/'c'
        else: out = ro/'c'
        r = run('phantom', out, '--studies', 2, '--quiet')
        assert r.returncode == 2 and str(out.parent) in r.stderr and 'Traceback' not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally: ro.chmod(0o700)
    occupied = tmp_path/'occ'; occupied.mkdir(); (occupied/'keep.txt').write_text('mine')
    r = run('phantom', occupied, '--studies', 2, '--quiet')
    assert r.returncode == 2 and 'not empty' in r.stderr
    assert (occupied/'keep.txt').read_text() == 'mine'


def test_settings_errors_name_the_setting(tmp_path):
    r = run('settings', env={'RWID_DATA_ROOTT': '/tmp/x'})
    assert r.returncode == 2 and 'RWID_DATA_ROOTT' in r.stderr and 'Traceback' not in r.stderr
    bad = tmp_path/'settings.ini'; bad.write_text('[rwid]\nseed = 1\ncolour = blue\n')
    r = run('settings', env={'RWID_SETTINGS': bad})
    assert r.returncode == 2 and "'colour'" in r.stderr
    r = run('settings', '--json', env={'RWID_SEED': '99'})
    assert r.returncode == 0 and json.loads(r.stdout)['seed'] == 99


def test_demo_makes_the_default_cohort(tmp_path):
    env = {'RWID_DATA_ROOT': tmp_path/'data', 'RWID_RUNS_ROOT': tmp_path/'runs', 'RWID_DEMO_STUDIES': '60',
           'RWID_SECRET_FILE': tmp_path/'secret', 'WANDB_MODE': 'offline'}
    r = run('demo', '--quiet', '--train-epochs', 1, '--train-size', 64, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path/'data'/'phantom'/'default'/'cohort.json').is_file()
    assert 'phantom cohort: 60 studies' in r.stdout
    # both training stages ran and left loadable model folders, tracked offline
    assert '(a) baseline' in r.stdout and '(b) RWiD fine-tuning' in r.stdout and 'baseline -> fine-tuned' in r.stdout
    for stage in ('baseline', 'finetune'):
        run_dir = tmp_path/'runs'/'demo'/stage
        assert (run_dir/'checkpoints'/'best'/'model.safetensors').is_file(), stage
        assert list((run_dir/'wandb').glob('offline-run-*')), stage
    ft = json.loads((tmp_path/'runs'/'demo'/'finetune'/'config.json').read_text())
    assert ft['init_from'] == str(tmp_path/'runs'/'demo'/'baseline'/'checkpoints'/'best') and ft['mode'] == 'lora'
    assert (tmp_path/'data'/'phantom'/'default_index'/'studies.parquet').is_file()
    assert 'per site:' in r.stdout and 'split_phantom_default.v1.parquet' in r.stdout
    r2 = run('demo', '--quiet', '--train-epochs', 1, '--train-size', 64, env=env)
    assert r2.returncode == 0 and 'reusing' in r2.stdout


def test_index_cohort_split_chain(tmp_path):
    "phantom -> index -> cohort (definition from data_manifests/) -> split, each through the command line."
    import pandas as pd
    r = run('phantom', tmp_path/'c', '--studies', 30, '--seed', 4, '--corrupt', 0.05, '--quiet')
    assert r.returncode == 0, r.stderr
    r = run('index', tmp_path/'c'/'dicom', '--out', tmp_path/'idx', '--reports', tmp_path/'c'/'reports.csv', '--quiet', '--workers', 2,
            env={'RWID_SECRET_FILE': tmp_path/'secret'})
    assert r.returncode == 0, r.stderr
    for t in ('instances', 'series', 'studies', 'quarantine'): assert (tmp_path/'idx'/f'{t}.parquet').is_file(), t
    inst = pd.read_parquet(tmp_path/'idx'/'instances.parquet'); quar = pd.read_parquet(tmp_path/'idx'/'quarantine.parquet')
    n_files = sum(1 for f in (tmp_path/'c'/'dicom').rglob('*') if f.is_file())
    assert len(inst) + len(quar) == n_files
    assert list(quar.columns[:3]) == ['path', 'reason', 'detail']
    r = run('cohort', ROOT/'data_manifests'/'phantom_default.v1.toml', '--index', tmp_path/'idx', '--out', tmp_path/'cohort.parquet')
    assert r.returncode == 0, r.stderr
    co = pd.read_parquet(tmp_path/'cohort.parquet')
    assert set(co.split) <= {'train', 'val', 'test', 'ood'} and (co.split == 'ood').any()
    assert set(co.loc[co.split == 'ood', 'site_id']) <= {'S05', 'S06'}
    r = run('split', tmp_path/'idx', '--out', tmp_path/'split.csv', '--held-out', 'S01', '--seed', 3)
    assert r.returncode == 0, r.stderr
    sp = pd.read_csv(tmp_path/'split.csv')
    assert set(sp.loc[sp.site_id == 'S01', 'split']) == {'ood'}
    assert sp.groupby('patient_key').split.nunique().max() == 1
    r = run('cohort', tmp_path/'nope.toml', '--index', tmp_path/'idx', '--out', tmp_path/'x.parquet')
    assert r.returncode == 2 and 'nope.toml' in r.stderr and 'Traceback' not in r.stderr
