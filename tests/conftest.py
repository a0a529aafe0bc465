"""Shared fixtures: phantom cohorts generated once per test session."""
import os
from pathlib import Path
import pytest

# Tests never reach a model hub. The Makefile exports this before Python starts; direct pytest runs get it here.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'offline')

ROOT = Path(__file__).resolve().parents[1]

# A cohort big enough that every site, modality, transfer syntax and injection kind occurs.
COHORT_ARGS = dict(n_studies=150, seed=11, inject_phi=0.3, corrupt=0.05)


@pytest.fixture(scope='session')
def cohort(tmp_path_factory):
    "A phantom cohort with PHI injected into 30% of studies and 5% of files damaged (2 worker processes)."
    from rwid_nb.data.phantom import generate_cohort
    out = tmp_path_factory.mktemp('phantom')/'cohort'
    generate_cohort(out, workers=2, progress=False, **COHORT_ARGS)
    return out


@pytest.fixture(scope='session')
def tables(cohort):
    import pandas as pd
    gt = pd.read_csv(cohort/'ground_truth.csv', dtype={'phi_kinds': str, 'corruption_kinds': str})
    reports = pd.read_csv(cohort/'reports.csv')
    phi = pd.read_csv(cohort/'phi_injections.csv', dtype=str)
    bad = pd.read_csv(cohort/'corruptions.csv')
    return dict(gt=gt, reports=reports, phi=phi, bad=bad)
